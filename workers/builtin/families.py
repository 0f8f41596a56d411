"""Built-in tiny models of the SDXL, SD3 and FLUX.1 families, for demos and tests.

`workers.builtin.tiny` gives the farm a Stable Diffusion 1.5 it can build with no files; these do the
same for the other families people render with, so the code paths a family takes (two or three
text encoders, SDXL's time ids, a transformer on packed latents, flow-matching schedulers,
Fill's extra input channels) run in tests and demos without a download. Each is the family's
own diffusers pipeline at the size of diffusers' fast-test components, with seeded random
weights, built offline and deterministically: the same bytes in every process on the same
torch version. See `tiny_sdxl`, `tiny_sd3` and `tiny_flux` for what each one is.

    >>> pipe = build_family_tiny("tiny-sdxl")          # StableDiffusionXLPipeline, 64×64
    >>> export_family_tiny("tiny-flux", "out/flux")    # an ordinary diffusers folder

    tiny-sdxl          StableDiffusionXLPipeline          txt2img, img2img, inpaint (blending)
    tiny-sdxl-inpaint  StableDiffusionXLInpaintPipeline   inpaint (9-channel UNet)
    tiny-sd3           StableDiffusion3Pipeline           txt2img, img2img, inpaint (blending)
    tiny-flux          FluxPipeline                       txt2img, img2img, inpaint (blending)
    tiny-flux-fill     FluxFillPipeline                   inpaint (masked image as input)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from diffusers import (
    DiffusionPipeline,
    FluxFillPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from workers.builtin import tiny_flux, tiny_sd3, tiny_sdxl

FAMILY_MODELS: dict[str, tuple[type[DiffusionPipeline], str]] = {
    "tiny-sdxl": (StableDiffusionXLPipeline, "sdxl"),
    "tiny-sdxl-inpaint": (StableDiffusionXLInpaintPipeline, "sdxl"),
    "tiny-sd3": (StableDiffusion3Pipeline, "sd3"),
    "tiny-flux": (FluxPipeline, "flux"),
    "tiny-flux-fill": (FluxFillPipeline, "flux"),
}
"""Built-in name → (diffusers pipeline class, family)."""

FAMILY_KINDS: dict[str, tuple[str, ...]] = {
    "tiny-sdxl": ("txt2img", "img2img", "inpaint"),
    "tiny-sdxl-inpaint": ("inpaint",),
    "tiny-sd3": ("txt2img", "img2img", "inpaint"),
    "tiny-flux": ("txt2img", "img2img", "inpaint"),
    "tiny-flux-fill": ("inpaint",),
}
"""What each built-in renders. A 4-channel model inpaints by blending latents (diffusers'
inpaint pipeline of its family over the same components); the dedicated inpainting models do
nothing else."""

_BUILDERS: dict[str, Any] = {"sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}
_components: dict[str, dict[str, Any]] = {}  # per process: name → built components


def build_family_tiny(name: str) -> DiffusionPipeline:
    """A fresh float32 CPU pipeline for a built-in model (weights are copied, never shared)."""
    pipeline_class, builder = _lookup(name)
    if name not in _components:
        _components[name] = builder.components(name)
    components = {k: copy.deepcopy(v) for k, v in _components[name].items()}
    return pipeline_class(**components, **builder.pipeline_options(name))


def export_family_tiny(name: str, out_dir: str | Path) -> Path:
    """Write a built-in model as a diffusers folder that its pipeline class loads offline."""
    out = Path(out_dir)
    build_family_tiny(name).save_pretrained(out, safe_serialization=True)
    return out


def build_builtin(name: str) -> DiffusionPipeline:
    """Any built-in model (`farm.jobs.refs.BUILTIN_MODELS`), fresh, float32, on the CPU."""
    if name in FAMILY_MODELS:
        return build_family_tiny(name)
    from workers.builtin.tiny import build_tiny

    return build_tiny(name)


def export_builtin(name: str, out_dir: str | Path) -> Path:
    """Any built-in model or IP-Adapter as the folder diffusers loads it from."""
    if name in FAMILY_MODELS:
        return export_family_tiny(name, out_dir)
    if name == "tiny-sdxl-ip-adapter":
        from workers.builtin.sdxl_ip_adapter import export_sdxl_ip_adapter

        return export_sdxl_ip_adapter(out_dir)
    if name == "tiny-ip-adapter":
        from workers.builtin.tiny_ip_adapter import export_tiny_ip_adapter

        return export_tiny_ip_adapter(out_dir)
    from workers.builtin.tiny import export_tiny

    return export_tiny(name, out_dir)


def build_components(name: str) -> dict[str, Any]:
    """A built-in's components built afresh, bypassing the cache (to check determinism)."""
    _, builder = _lookup(name)
    return builder.components(name)


def _lookup(name: str) -> tuple[type[DiffusionPipeline], Any]:
    if name not in FAMILY_MODELS:
        choices = ", ".join(FAMILY_MODELS)
        raise ValueError(f"unknown built-in model {name!r}; choose one of {choices}")
    pipeline_class, family = FAMILY_MODELS[name]
    return pipeline_class, _BUILDERS[family]
