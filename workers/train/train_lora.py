"""LoRA training on a warm pipeline, the way diffusers' `train_text_to_image_lora.py` and
`train_dreambooth_lora.py` train: pure compute, no Redis, no storage.

    >>> with LoraTrainer(pipe, spec, images, captions) as trainer:
    ...     trainer.resume(checkpoint)                   # optional: continue a stopped run
    ...     trainer.run(on_step=..., on_checkpoint=...)  # until max_train_steps, or stopped
    ...     adapter = trainer.adapter_bytes()            # diffusers' pytorch_lora_weights format

The LoRA layers are added with peft (`add_adapter`) to the pipeline's own UNet (and text
encoder), trained, and removed again on exit, so the warm pipeline a worker renders with is
the same module tree with the same weights afterwards: a render after a fine-tune equals a
render before it. Nothing is copied: the frozen weights are shared, only the LoRA parameters
(and their AdamW state) are new.

Determinism: everything random comes from generators seeded from `spec.seed`: the LoRA
initialisation (torch's global generator, seeded), the data order (a permutation per epoch
drawn from `seed + epoch`, so the position in the data follows from the step), and the noise,
timesteps and VAE samples (one CPU generator whose state is checkpointed). A run resumed from a
checkpoint on CPU ends with the same adapter, to the bit, as one that never stopped.

Interruptible steps: a 512 px step takes minutes on a CPU, so a cancel or a shutdown does not
wait for the step to end. `run(..., should_stop=...)` asks between micro-steps and at every
convolution and linear layer of the forward and backward passes (module hooks and gradient
hooks); when it says stop, the step is abandoned (`Interrupted`): its gradients are dropped and
the random generators put back as they were at its start, so the trainer is exactly at the
last whole step and a checkpoint taken then resumes bit for bit.

Precision: on a GPU the frozen weights stay in the worker's dtype (float16), the LoRA
parameters train in float32, and `mixed_precision` (`fp16`/`bf16`) turns on autocast (fp16 with
a gradient scaler). A CPU worker trains in float32 whatever `mixed_precision` says.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, recurse_remove_peft_layers
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image

from farm.jobs.specs import Finetune
from farm.keys import ADAPTER_FILE
from workers.train.checkpoints import Checkpoint
from workers.train.interrupt import Interrupted, StopFn, interruptible

ADAPTER_NAME = "farm_finetune"
"""The peft adapter name while training (removed before the pipeline renders again)."""

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
"""UNet attention projections that get LoRA layers (as diffusers' scripts choose)."""

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

ADAM = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
"""AdamW settings: the defaults of diffusers' training scripts."""

StepFn = Callable[[int, int, float], bool]
"""`on_step(step, total, loss)` after each optimizer step; True stops training there."""


def preprocess(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution` (bilinear), center-crop a square, scale to
    [-1, 1]: the scripts' `Resize`, `CenterCrop`, `ToTensor`, `Normalize([0.5], [0.5])`."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    size = (
        max(resolution, round(image.width * scale)),
        max(resolution, round(image.height * scale)),
    )
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class LoraTrainer:
    """One fine-tune on a pipeline: LoRA layers attached on enter, removed on exit."""

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        spec: Finetune,
        images: list[Image.Image],
        captions: list[str],
    ) -> None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.pipe = pipe
        self.spec = spec
        self.images = images
        self.captions = captions
        self.device = pipe.device
        self.seed = spec.seed or 0
        self.step = 0
        self.losses: list[float] = []
        self.resumed_from: int | None = None
        self._exit = contextlib.ExitStack()

    # ----------------------------------------------------------------------- set up / tear down

    def __enter__(self) -> LoraTrainer:
        self._exit.callback(self._detach)
        try:
            return self._attach()
        except BaseException:
            self._exit.close()  # a half-attached adapter never outlives the job
            raise

    def _attach(self) -> LoraTrainer:
        pipe, spec = self.pipe, self.spec
        # 1. Freeze the model; add LoRA layers (peft) to the UNet, and the text encoder if asked.
        #    Their initial weights come from the job's seed, not the worker's history.
        self.modules = {"unet": pipe.unet}
        if spec.train_text_encoder:
            self.modules["text_encoder"] = pipe.text_encoder
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        alpha = spec.lora_alpha or spec.rank
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            pipe.unet.add_adapter(self._config(UNET_TARGETS, alpha), adapter_name=ADAPTER_NAME)
            if spec.train_text_encoder:
                # peft directly, as diffusers' own text-encoder LoRA loader does: transformers'
                # `add_adapter` wants a newer peft than this farm pins.
                config = self._config(TEXT_ENCODER_TARGETS, alpha)
                inject_adapter_in_model(config, pipe.text_encoder, adapter_name=ADAPTER_NAME)
                pipe.text_encoder.peft_config = {ADAPTER_NAME: config}
        for module in self.modules.values():
            cast_training_params(module, dtype=torch.float32)  # LoRA params train in float32
            module.train()
        self.params = [
            p for module in self.modules.values() for p in module.parameters() if p.requires_grad
        ]
        # 2. The noise schedule the model was trained with: DDPM from its scheduler's config.
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        # 3. Training data: pixels at `resolution`, captions tokenized once.
        self.pixels = torch.stack([preprocess(img, spec.resolution) for img in self.images])
        tokens = pipe.tokenizer(
            self.captions,
            max_length=pipe.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        self.input_ids = tokens.input_ids
        # 4. AdamW on the LoRA parameters only; a gradient scaler for fp16 on a GPU.
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.learning_rate, **ADAM)
        self.autocast_dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        # 5. Every random draw of training comes from here (checkpointed with the rest).
        self.noise_generator = torch.Generator("cpu").manual_seed(self.seed)
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit.close()

    def _config(self, targets: list[str], alpha: float) -> LoraConfig:
        return LoraConfig(
            r=self.spec.rank,
            lora_alpha=alpha,
            init_lora_weights="gaussian",
            target_modules=targets,
        )

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.device.type != "cuda" or self.spec.mixed_precision == "no":
            return None  # a CPU trains in float32
        return torch.float16 if self.spec.mixed_precision == "fp16" else torch.bfloat16

    def _detach(self) -> None:
        """Put the pipeline back as it was: no LoRA layers of ours, eval mode. Adapters that
        were loaded before (a render's, if any were left) stay; without them, every peft
        layer goes, so the module tree is the original one again."""
        for module in (self.pipe.unet, self.pipe.text_encoder):
            configs = getattr(module, "peft_config", None)
            if not configs or ADAPTER_NAME not in configs:
                continue
            if set(configs) == {ADAPTER_NAME}:
                recurse_remove_peft_layers(module)
                del module.peft_config
                module._hf_peft_config_loaded = None
            else:
                for layer in module.modules():
                    if isinstance(layer, BaseTunerLayer):
                        layer.delete_adapter(ADAPTER_NAME)
                configs.pop(ADAPTER_NAME)
            module.eval()
        self.optimizer = None
        self.params = []

    # ----------------------------------------------------------------------- checkpoints

    def snapshot(self) -> Checkpoint:
        """The state to resume from: LoRA weights, optimizer, step, RNG states, loss log."""
        lora = {
            f"{name}.{key}": value.detach().cpu()
            for name, module in self.modules.items()
            for key, value in get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME).items()
        }
        rng = {
            "torch_cpu": torch.get_rng_state(),
            "noise": self.noise_generator.get_state(),
        }
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return Checkpoint(
            step=self.step,
            losses=list(self.losses),
            lora=lora,
            optimizer=self.optimizer.state_dict(),
            rng=rng,
            python_random=random.getstate(),
            scaler=self.scaler.state_dict() if self.scaler else None,
        )

    def resume(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint instead of step 0."""
        for name, module in self.modules.items():
            prefix = f"{name}."
            weights = {k[len(prefix) :]: v for k, v in ckpt.lora.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(module, weights, adapter_name=ADAPTER_NAME)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint does not fit the {name}: {result.unexpected_keys}")
        self.optimizer.load_state_dict(ckpt.optimizer)
        torch.set_rng_state(ckpt.rng["torch_cpu"])
        self.noise_generator.set_state(ckpt.rng["noise"])
        if self.device.type == "cuda" and "torch_cuda" in ckpt.rng:
            torch.cuda.set_rng_state(ckpt.rng["torch_cuda"], self.device)
        if ckpt.python_random is not None:
            random.setstate(ckpt.python_random)
        if self.scaler and ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        self.step = ckpt.step
        self.losses = list(ckpt.losses)
        self.resumed_from = ckpt.step

    # ----------------------------------------------------------------------- training

    def run(
        self,
        on_step: StepFn,
        on_checkpoint: Callable[[Checkpoint], None],
        should_stop: StopFn | None = None,
    ) -> bool:
        """Train from `self.step` to `max_train_steps`; False if `on_step` stopped it after a
        step, or `should_stop` within one (that step abandoned: see the module docstring)."""
        spec = self.spec
        modules = (self.pipe.vae.encoder, self.pipe.unet, self.pipe.text_encoder)
        with interruptible(modules, should_stop):
            while self.step < spec.max_train_steps:
                # 6. One optimizer step over `gradient_accumulation_steps` micro-batches.
                rng = self._rng_state()
                try:
                    self.optimizer.zero_grad(set_to_none=True)
                    micro_losses = []
                    for micro in range(spec.gradient_accumulation_steps):
                        if should_stop is not None and should_stop():
                            raise Interrupted
                        index = self.step * spec.gradient_accumulation_steps + micro
                        loss = self._loss(self._batch(index)) / spec.gradient_accumulation_steps
                        self._backward(loss)
                        micro_losses.append(loss.item())
                except Interrupted:
                    # The state is the last whole step's again: no gradients, the generators
                    # as they were when this step began.
                    self.optimizer.zero_grad(set_to_none=True)
                    self._set_rng_state(rng)
                    return False
                self._optimizer_step()
                self.step += 1
                self.losses.append(sum(micro_losses))
                # 7. Every `checkpointing_steps`: the whole state to storage, for a retry.
                if self.step % spec.checkpointing_steps == 0 and self.step < spec.max_train_steps:
                    on_checkpoint(self.snapshot())
                if on_step(self.step, spec.max_train_steps, self.losses[-1]):
                    return self.step >= spec.max_train_steps
        return True

    def _rng_state(self) -> dict[str, Any]:
        state = {
            "torch_cpu": torch.get_rng_state(),
            "noise": self.noise_generator.get_state(),
            "python": random.getstate(),
        }
        if self.device.type == "cuda":
            state["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch_cpu"])
        self.noise_generator.set_state(state["noise"])
        random.setstate(state["python"])
        if "torch_cuda" in state:
            torch.cuda.set_rng_state(state["torch_cuda"], self.device)

    def _batch(self, micro_step: int) -> list[int]:
        """Example indices of a micro-batch. The data is an endless run of epochs, each a
        permutation drawn from `seed + epoch`, so where a resumed run picks up is a function
        of the step alone."""
        n, size = len(self.images), self.spec.train_batch_size
        out = []
        for i in range(micro_step * size, (micro_step + 1) * size):
            epoch, position = divmod(i, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(int(order[position]))
        return out

    def _loss(self, indices: list[int]) -> torch.Tensor:
        """Noise-prediction MSE on one micro-batch (the scripts' loss, SNR weighting off)."""
        pipe, gen = self.pipe, self.noise_generator
        with torch.no_grad():
            pixels = self.pixels[indices].to(self.device, dtype=pipe.vae.dtype)
            latents = pipe.vae.encode(pixels).latent_dist.sample(generator=gen)
            latents = latents * pipe.vae.config.scaling_factor
        noise = randn_tensor(latents.shape, generator=gen, device=self.device, dtype=latents.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=gen).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        input_ids = self.input_ids[indices].to(self.device)
        with self._autocast():
            grad = torch.enable_grad() if self.spec.train_text_encoder else torch.no_grad()
            with grad:
                encoder_hidden_states = pipe.text_encoder(input_ids, return_dict=False)[0]
            pred = pipe.unet(
                noisy.to(pipe.unet.dtype),
                timesteps,
                encoder_hidden_states.to(pipe.unet.dtype),
                return_dict=False,
            )[0]
        return F.mse_loss(pred.float(), target.float(), reduction="mean")

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    # ----------------------------------------------------------------------- the result

    def adapter_bytes(self) -> bytes:
        """The trained adapter as diffusers writes it (`save_lora_weights`), with its LoRA
        config (rank, alpha, targets) in the file's metadata so `load_lora_weights` scales it
        right."""
        layers: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        for name, module in self.modules.items():
            state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state)
            metadata[f"{name}_lora_adapter_metadata"] = module.peft_config[ADAPTER_NAME].to_dict()
        with tempfile.TemporaryDirectory(prefix="farm-lora-") as tmp:
            StableDiffusionPipeline.save_lora_weights(
                tmp, safe_serialization=True, weight_name=ADAPTER_FILE, **layers, **metadata
            )
            return (Path(tmp) / ADAPTER_FILE).read_bytes()
