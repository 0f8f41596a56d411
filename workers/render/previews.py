"""Previews while a render runs: the latents mapped to RGB by a fixed linear approximation.

No second model (no VAE decode, no tiny autoencoder): each latent channel contributes a fixed
RGB weight, the factors the community uses for live previews of each latent space (4-channel
SD 1.x/2.x and SDXL, 16-channel SD3 and FLUX.1), so a preview costs a few microseconds and an
8th of the image's size. It only reads the latents (detached, copied to the CPU): a render with
previews gives the very pixels of one without (tested).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

SD15 = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]
SDXL = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
SD3 = [
    [-0.0922, -0.0175, 0.0749],
    [0.0311, 0.0633, 0.0954],
    [0.1994, 0.0927, 0.0458],
    [0.0856, 0.0339, 0.0902],
    [0.0587, 0.0272, -0.0496],
    [-0.0006, 0.1104, 0.0309],
    [0.0978, 0.0306, 0.0427],
    [-0.0042, 0.1038, 0.1358],
    [-0.0194, 0.0020, 0.0669],
    [-0.0488, 0.0130, -0.0268],
    [0.0922, 0.0988, 0.0951],
    [-0.0278, 0.0524, -0.0542],
    [0.0332, 0.0456, 0.0895],
    [-0.0069, -0.0030, -0.0810],
    [-0.0596, -0.0465, -0.0293],
    [-0.1448, -0.1463, -0.1189],
]


def factors(pipe: Any, channels: int) -> torch.Tensor | None:
    """The (channels, 3) RGB factors of `pipe`'s latent space, None for one we do not know."""
    if channels == 4:
        return torch.tensor(SDXL if "XL" in type(pipe).__name__ else SD15)
    if channels == 16:
        return torch.tensor(SD3)
    return None


def spatial(
    pipe: Any, latents: torch.Tensor, height: int | None, width: int | None
) -> torch.Tensor:
    """Latents as (batch, channels, h, w): FLUX.1 packs them as (batch, tokens, 64)."""
    if latents.ndim == 3 and hasattr(pipe, "_unpack_latents") and height and width:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    return latents


def preview(
    pipe: Any, latents: torch.Tensor, height: int | None = None, width: int | None = None
) -> list[Image.Image]:
    """One small RGB picture per image of the batch, from the latents after a step."""
    with torch.no_grad():
        x = spatial(pipe, latents.detach(), height, width).to("cpu", torch.float32)
        if x.ndim != 4:
            return []
        f = factors(pipe, x.shape[1])
        rgb = torch.einsum("bchw,cr->bhwr", x, f) if f is not None else x[:, :3].permute(0, 2, 3, 1)
        rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in rgb]
