"""Speed options a worker applies to each pipeline it loads: channels_last and torch.compile.

    FARM_CHANNELS_LAST=1 FARM_COMPILE=1 farm worker --device cuda:0

Both apply to the pipeline's denoiser (the UNet of SD and SDXL, the transformer of SD3 and
FLUX.1) and its VAE, whatever the family. Both are off by default: they pay on large GPUs
(bench/gpu.py measures each), cost memory or start-up time elsewhere, and `torch.compile`
recompiles for each new batch size or image size the worker meets. Neither changes what a job
means; compiled kernels may change pixels by floating-point rounding, so a farm that needs
bit-identical pixels to plain diffusers leaves `compile` off.

channels_last is a layout of 4-D tensors: it is what the convolutions of a UNet and a VAE want
(diffusers' "speed up inference" guide); a transformer's weights are 2-D and its one patch
convolution is not worth a copy, so a transformer is left as it is. Modules are compiled in
place (`nn.Module.compile`), so the pipeline's components keep their classes: `from_pipe`,
LoRA loading and offload hooks see the same modules.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.models.families import denoiser_of


def optimize(pipe: Any, *, channels_last: bool = False, compile: bool = False) -> Any:
    """Apply the options to `pipe`'s denoiser and VAE in place; returns `pipe`."""
    denoiser, vae = denoiser_of(pipe), getattr(pipe, "vae", None)
    if channels_last:
        # NHWC convolutions: the layout tensor cores want.
        for module in (getattr(pipe, "unet", None), vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if compile:
        # The denoiser runs once per step: that is where compiling pays. `fullgraph=False`
        # keeps LoRA hooks and callbacks working; the first call (and each new shape)
        # compiles. The VAE is called through `decode` (and `encode`), not `forward`.
        if denoiser is not None:
            denoiser.compile()
        if vae is not None:
            vae.decode = torch.compile(vae.decode)
    return pipe


def from_settings(settings: Any) -> Any:
    """The `PipelineCache.prepare` hook these settings ask for (None: nothing to do)."""
    if not (settings.channels_last or settings.compile):
        return None

    def prepare(pipe: Any) -> Any:
        return optimize(pipe, channels_last=settings.channels_last, compile=settings.compile)

    return prepare
