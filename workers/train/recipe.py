"""What training a LoRA on one model family takes, beside the loop they all share.

`LoraTrainer` (`workers.train.train_lora`) owns what every family does alike: LoRA layers in
and out, AdamW, the data order, the VAE's latents, checkpoints, interruptible steps. A
`Recipe` is the rest, written after that family's diffusers training script:

    family   recipe                      script it follows           objective
    sd       `unet.NoisePrediction`      train_dreambooth_lora.py     DDPM noise (or v) MSE
    sdxl     `unet.Sdxl`                 train_dreambooth_lora_sdxl   the same, two text encoders,
                                                                      size and crop time ids
    sd3      `flow.Sd3`                  train_dreambooth_lora_sd3    flow matching, preconditioned
    flux     `flow.Flux`                 train_dreambooth_lora_flux   flow matching, packed latents,
                                                                      guidance embedding

Each says which modules get LoRA layers (`denoiser`, `denoiser_targets`, and with
`train_text_encoder` its `text_encoders`), how captions become conditioning, the loss of a
micro-batch of latents, and how the adapter is saved (its pipeline class's
`save_lora_weights`, peft's names converted to diffusers' where that script converts them), so
that pipeline class's `load_lora_weights` reads the file back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from farm.jobs.specs import Finetune

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""CLIP attention projections that get LoRA layers with `train_text_encoder` (every script)."""


@dataclass(frozen=True)
class Example:
    """One training picture, prepared once: its pixels at the training resolution, and the
    size and crop it came from (SDXL conditions its UNet on both)."""

    pixels: torch.Tensor
    """(3, resolution, resolution) in [-1, 1]."""
    original_size: tuple[int, int]
    """(height, width) of the picture before it was resized."""
    crop_top_left: tuple[int, int]
    """(top, left) of the square cut from the resized picture."""


def prepare(image: Image.Image, resolution: int) -> Example:
    """Resize the shorter side to `resolution` (bilinear), center-crop a square, scale to
    [-1, 1]: the scripts' `Resize`, `CenterCrop`, `ToTensor`, `Normalize([0.5], [0.5])`, with the
    original size and the crop's corner the SDXL script records for its time ids."""
    image = image.convert("RGB")
    original = (image.height, image.width)
    scale = resolution / min(image.size)
    size = (
        max(resolution, round(image.width * scale)),
        max(resolution, round(image.height * scale)),
    )
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return Example(torch.from_numpy(array).permute(2, 0, 1), original, (top, left))


def tokenize(tokenizer: Any, captions: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids, padded to `max_length` (the tokenizer's own by default), as the scripts'
    `tokenize_prompt` pads them."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


class Recipe:
    """How one family trains (see the module docstring). Built by `LoraTrainer` on enter, once
    the modules are frozen and the LoRA layers in."""

    family: ClassVar[str]
    pipeline_class: ClassVar[str]
    """The diffusers pipeline class whose `save_lora_weights` writes the adapter."""
    denoiser: ClassVar[str] = "unet"
    denoiser_targets: ClassVar[tuple[str, ...]]
    """Module names (peft's `target_modules`) that get LoRA layers in the denoiser."""
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    """The text encoders `train_text_encoder` adds LoRA layers to (the CLIPs, never T5)."""
    diffusers_keys: ClassVar[bool] = True
    """Whether the saved adapter's keys are converted to diffusers' `lora.down/up` names (the
    UNet scripts do) or left as peft's `lora_A/lora_B` (the SD3 and FLUX.1 scripts)."""

    def __init__(
        self, pipe: Any, spec: Finetune, examples: list[Example], captions: list[str]
    ) -> None:
        self.pipe = pipe
        self.spec = spec
        self.examples = examples
        self.device = pipe.device
        self.trained = set(self.text_encoders) if spec.train_text_encoder else set()
        self.tokens = self.tokenize(captions)

    # ------------------------------------------------------------------- to override

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Every caption's token ids, per text encoder (by component name)."""
        raise NotImplementedError

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE samples → the latents the denoiser sees (scaled, and shifted where the VAE
        says)."""
        config = self.pipe.vae.config
        shift = config.get("shift_factor") or 0.0
        return (latents - shift) * config.scaling_factor

    def loss(
        self, latents: torch.Tensor, indices: list[int], generator: torch.Generator
    ) -> torch.Tensor:
        """The loss of one micro-batch: `latents` of the examples at `indices`; every random
        draw from `generator`."""
        raise NotImplementedError

    # ------------------------------------------------------------------- shared

    @property
    def denoiser_module(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser)

    def ids(self, name: str, indices: list[int]) -> torch.Tensor:
        return self.tokens[name][indices].to(self.device)

    def grad(self, name: str) -> Any:
        """Gradients through text encoder `name` only when it trains."""
        return torch.enable_grad() if name in self.trained else torch.no_grad()

    def clip_states(self, name: str, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A CLIP encoder's penultimate hidden states and its first output (the pooled, or
        projected, embedding), as the SDXL and SD3 scripts and pipelines read them."""
        with self.grad(name):
            out = getattr(self.pipe, name)(self.ids(name, indices), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(
            latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
        )
