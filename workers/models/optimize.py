"""Speed options a worker applies to each pipeline it loads: channels_last and torch.compile.

    FARM_CHANNELS_LAST=1 FARM_COMPILE=1 farm worker --device cuda:0

Both are off by default: they pay on large GPUs (bench/gpu.py measures each), cost memory or
start-up time elsewhere, and `torch.compile` recompiles for each new batch size or image size
the worker meets. Neither changes what a job means; compiled kernels may change pixels by
floating-point rounding, so a farm that needs bit-identical pixels to plain diffusers leaves
`compile` off.
"""

from __future__ import annotations

from typing import Any

import torch


def optimize(pipe: Any, *, channels_last: bool = False, compile: bool = False) -> Any:
    """Apply the options to `pipe`'s UNet and VAE in place; returns `pipe`."""
    if channels_last:
        # NHWC convolutions: the layout tensor cores want (diffusers' "speed up" guide).
        pipe.unet.to(memory_format=torch.channels_last)
        if getattr(pipe, "vae", None) is not None:
            pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        # The UNet runs once per step: that is where compiling pays. `fullgraph=False` keeps
        # LoRA hooks and callbacks working; the first call (and each new shape) compiles.
        pipe.unet = torch.compile(pipe.unet)
    return pipe


def from_settings(settings: Any) -> Any:
    """The `PipelineCache.prepare` hook these settings ask for (None: nothing to do)."""
    if not (settings.channels_last or settings.compile):
        return None

    def prepare(pipe: Any) -> Any:
        return optimize(pipe, channels_last=settings.channels_last, compile=settings.compile)

    return prepare
