"""LoRA training on a warm pipeline of any family, the way diffusers' DreamBooth LoRA scripts
train it: pure compute, no Redis, no storage.

    >>> with LoraTrainer(pipe, spec, images, captions) as trainer:
    ...     trainer.resume(checkpoint)                   # optional: continue a stopped run
    ...     trainer.run(on_step=..., on_checkpoint=...)  # until max_train_steps, or stopped
    ...     adapter = trainer.adapter_bytes()            # diffusers' pytorch_lora_weights format

The LoRA layers are added with peft (`add_adapter`) to the pipeline's own denoiser (UNet or
transformer) and, with `train_text_encoder`, its CLIP text encoders, trained, and removed again
on exit, so the warm pipeline a worker renders with is the same module tree with the same
weights afterwards: a render after a fine-tune equals a render before it. Nothing is copied:
the frozen weights are shared, only the LoRA parameters (and their AdamW state) are new.

What differs by family (which modules, the conditioning, the objective, the saved layout) is
its `Recipe` (`recipe_for`: `workers.train.unet` for SD and SDXL, `workers.train.flow` for
SD3 and FLUX.1); the loop, the data order, the latents and the checkpoints are the same for
all. A pipeline of a family that cannot train is refused (`InvalidJob`) before anything is
attached.

Determinism: everything random comes from generators seeded from `spec.seed`: the LoRA
initialisation (torch's global generator, seeded), the data order (a permutation per epoch
drawn from `seed + epoch`, so the position in the data follows from the step), and the noise,
timesteps and VAE samples (one CPU generator whose state is checkpointed). Each picture is
encoded by the VAE once, alone (so its latent distribution does not depend on which pictures
shared a batch, or on where a run resumed), and sampled from at every step. A run resumed from
a checkpoint on CPU ends with the same adapter, to the bit, as one that never stopped.

Interruptible steps: a 512 px step takes minutes on a CPU, so a cancel or a shutdown does not
wait for the step to end. `run(..., should_stop=...)` asks between micro-steps and at every
convolution and linear layer of the forward and backward passes (module hooks and gradient
hooks); when it says stop, the step is abandoned (`Interrupted`): its gradients are dropped and
the random generators put back as they were at its start, so the trainer is exactly at the
last whole step and a checkpoint taken then resumes bit for bit.

Precision: on a GPU the frozen weights stay in the worker's dtype (float16, or bfloat16 for
SD3 and FLUX.1), the LoRA parameters train in float32, and `mixed_precision` (`fp16`/`bf16`)
turns on autocast (fp16 with a gradient scaler). A VAE that asks for it (`force_upcast`,
SDXL's) encodes in float32, as the SDXL script keeps it. A CPU worker trains in float32
whatever `mixed_precision` says.
"""

from __future__ import annotations

import contextlib
import copy
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, recurse_remove_peft_layers
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image

from farm.errors import InvalidJob
from farm.jobs.specs import Finetune
from farm.keys import ADAPTER_FILE
from workers.models.families import info_of
from workers.train import checkpoints
from workers.train.checkpoints import Checkpoint
from workers.train.flow import Flux, Sd3
from workers.train.interrupt import Interrupted, StopFn, interruptible
from workers.train.recipe import TEXT_ENCODER_TARGETS, Example, Recipe, prepare
from workers.train.unet import NoisePrediction, Sdxl

ADAPTER_NAME = "farm_finetune"
"""The peft adapter name while training (removed before the pipeline renders again)."""

RECIPES: dict[str, type[Recipe]] = {r.family: r for r in (NoisePrediction, Sdxl, Sd3, Flux)}
"""How each family trains, by family name (`farm.jobs.families.Family.trainable` says which)."""

ADAM = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
"""AdamW settings: the defaults of diffusers' training scripts."""

StepFn = Callable[[int, int, float], bool]
"""`on_step(step, total, loss)` after each optimizer step; True stops training there."""


def recipe_for(pipe: Any, spec: Finetune) -> type[Recipe]:
    """The recipe that trains `pipe`'s family, or `InvalidJob` saying why it cannot train (a
    family without fine-tunes, an inpainting model, a model without its first text encoder, a
    resolution the model cannot take)."""
    model = spec.model
    info = info_of(pipe, model)
    info.check_finetune(spec.resolution, model)
    if info.family not in RECIPES:
        raise InvalidJob(f"model {model!r}: {info.family} models cannot be fine-tuned here")
    return RECIPES[info.family]


class LoraTrainer:
    """One fine-tune on a pipeline: LoRA layers attached on enter, removed on exit."""

    def __init__(
        self,
        pipe: Any,
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
        self.recipe_class = recipe_for(pipe, spec)
        self.device = pipe.device
        self.seed = spec.seed or 0
        self.step = 0
        self.losses: list[float] = []
        self.resumed_from: int | None = None
        self.modules: dict[str, torch.nn.Module] = {}
        self._latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
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
        pipe, spec, recipe = self.pipe, self.spec, self.recipe_class
        # 1. Freeze the model; add LoRA layers (peft) to the denoiser, and to the family's CLIP
        #    text encoders if asked. Their initial weights come from the job's seed, not the
        #    worker's history.
        self.modules = {recipe.denoiser: getattr(pipe, recipe.denoiser)}
        if spec.train_text_encoder:
            self.modules.update({name: getattr(pipe, name) for name in recipe.text_encoders})
        requires_grad = {p: p.requires_grad for m in self.frozen for p in m.parameters()}
        self._exit.callback(self._restore_requires_grad, requires_grad)
        for module in self.frozen:
            module.requires_grad_(False)
        alpha = spec.lora_alpha or spec.rank
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for name, module in self.modules.items():
                if name == recipe.denoiser:
                    config = self._config(recipe.denoiser_targets, alpha)
                    module.add_adapter(config, adapter_name=ADAPTER_NAME)
                else:
                    # peft directly, as diffusers' own text-encoder LoRA loader does:
                    # transformers' `add_adapter` wants a newer peft than this farm pins.
                    config = self._config(TEXT_ENCODER_TARGETS, alpha)
                    inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
                    module.peft_config = {ADAPTER_NAME: config}
        for module in self.modules.values():
            cast_training_params(module, dtype=torch.float32)  # LoRA params train in float32
            module.train()
        self.params = [
            p for module in self.modules.values() for p in module.parameters() if p.requires_grad
        ]
        # 2. Training data: pixels at `resolution` (with their original size and crop, for
        #    SDXL), captions tokenized once; the family's conditioning and objective.
        self.examples: list[Example] = [prepare(img, spec.resolution) for img in self.images]
        self.pixels = torch.stack([example.pixels for example in self.examples])
        self.recipe = recipe(pipe, spec, self.examples, self.captions)
        # 3. AdamW on the LoRA parameters only; a gradient scaler for fp16 on a GPU.
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.learning_rate, **ADAM)
        self.autocast_dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        # 4. Every random draw of training comes from here (checkpointed with the rest).
        self.noise_generator = torch.Generator("cpu").manual_seed(self.seed)
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit.close()

    @property
    def frozen(self) -> list[torch.nn.Module]:
        """The modules a step runs through: the denoiser, the VAE and every text encoder."""
        names = [self.recipe_class.denoiser, "vae"]
        names += [n for n in self.pipe.components if n.startswith("text_encoder")]
        modules = [getattr(self.pipe, name, None) for name in names]
        return [m for m in modules if isinstance(m, torch.nn.Module)]

    def _config(self, targets: tuple[str, ...], alpha: float) -> LoraConfig:
        return LoraConfig(
            r=self.spec.rank,
            lora_alpha=alpha,
            init_lora_weights="gaussian",
            target_modules=list(targets),
        )

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.device.type != "cuda" or self.spec.mixed_precision == "no":
            return None  # a CPU trains in float32
        return torch.float16 if self.spec.mixed_precision == "fp16" else torch.bfloat16

    @staticmethod
    def _restore_requires_grad(flags: dict[torch.nn.Parameter, bool]) -> None:
        """The frozen weights' `requires_grad` as the pipeline had them: CPU kernels can
        differ in the last bit with it (SDXL's UNet does), and a render after a fine-tune must
        equal one before it."""
        for param, flag in flags.items():
            param.requires_grad_(flag)

    def _detach(self) -> None:
        """Put the pipeline back as it was: no LoRA layers of ours, eval mode. Adapters that
        were loaded before (a render's, if any were left) stay; without them, every peft
        layer goes, so the module tree is the original one again."""
        for module in self.frozen:
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
        """The state to resume from: LoRA weights, optimizer, step, RNG states, loss log; a
        copy, which the steps after it leave alone (`.cpu()` of a CPU tensor is the tensor)."""
        lora = {
            f"{name}.{key}": value.detach().cpu().clone()
            for name, module in self.modules.items()
            for key, value in get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME).items()
        }
        rng = checkpoints.rng_state(self.noise_generator, self.device)
        python_random = rng.pop("python")
        return Checkpoint(
            step=self.step,
            losses=list(self.losses),
            lora=lora,
            optimizer=copy.deepcopy(self.optimizer.state_dict()),
            rng=rng,
            python_random=python_random,
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
        checkpoints.set_rng_state(
            {**ckpt.rng, "python": ckpt.python_random}, self.noise_generator, self.device
        )
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
        with interruptible(self.frozen, should_stop):
            while self.step < spec.max_train_steps:
                # 5. One optimizer step over `gradient_accumulation_steps` micro-batches.
                rng = checkpoints.rng_state(self.noise_generator, self.device)
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
                    checkpoints.set_rng_state(rng, self.noise_generator, self.device)
                    return False
                self._optimizer_step()
                self.step += 1
                self.losses.append(sum(micro_losses))
                # 6. Every `checkpointing_steps`: the whole state to storage, for a retry.
                if self.step % spec.checkpointing_steps == 0 and self.step < spec.max_train_steps:
                    on_checkpoint(self.snapshot())
                if on_step(self.step, spec.max_train_steps, self.losses[-1]):
                    return self.step >= spec.max_train_steps
        return True

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

    def _loss(self, indices: list[int], generator: torch.Generator | None = None) -> torch.Tensor:
        """The family's loss on one micro-batch, from latents sampled for it."""
        generator = generator or self.noise_generator
        latents = self._sample_latents(indices, generator)
        with self._autocast():
            return self.recipe.loss(latents, indices, generator)

    def validation_loss(self, seed: int = 0) -> float:
        """The loss over every example with its random draws (latents, noise, timesteps) fixed
        by `seed`, without gradients or any change to the training state: the same number
        before and after training says what the training did."""
        with torch.no_grad():
            generator = torch.Generator("cpu").manual_seed(seed)
            return float(self._loss(list(range(len(self.examples))), generator))

    def _sample_latents(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        """VAE latents of the examples at `indices`, sampled from each picture's latent
        distribution (encoded once, alone, the first time it is used), normalized as the
        denoiser takes them."""
        vae = self.pipe.vae
        for i in dict.fromkeys(indices):
            if i in self._latents:
                continue
            # A VAE that cannot encode in float16 (SDXL's: `force_upcast`) encodes in float32.
            upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
            with torch.no_grad():
                try:
                    if upcast:
                        vae.to(torch.float32)
                    pixels = self.pixels[i : i + 1].to(self.device, dtype=vae.dtype)
                    dist = vae.encode(pixels).latent_dist
                finally:
                    if upcast:
                        vae.to(torch.float16)
            self._latents[i] = (dist.mean[0].float(), dist.std[0].float())
        mean = torch.stack([self._latents[i][0] for i in indices])
        std = torch.stack([self._latents[i][1] for i in indices])
        noise = randn_tensor(mean.shape, generator=generator, device=self.device, dtype=mean.dtype)
        return self.recipe.normalize(mean + std * noise)

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
        """The trained adapter as diffusers writes it (the family pipeline's
        `save_lora_weights`, so its `load_lora_weights` reads it), with its LoRA config (rank, alpha, targets) in the file's metadata so `load_lora_weights` scales it
        right."""
        layers: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        for name, module in self.modules.items():
            state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
            if self.recipe_class.diffusers_keys:
                state = convert_state_dict_to_diffusers(state)
            layers[f"{name}_lora_layers"] = state
            metadata[f"{name}_lora_adapter_metadata"] = module.peft_config[ADAPTER_NAME].to_dict()
        pipeline_class = getattr(diffusers, self.recipe_class.pipeline_class)
        with tempfile.TemporaryDirectory(prefix="farm-lora-") as tmp:
            pipeline_class.save_lora_weights(
                tmp, safe_serialization=True, weight_name=ADAPTER_FILE, **layers, **metadata
            )
            return (Path(tmp) / ADAPTER_FILE).read_bytes()
