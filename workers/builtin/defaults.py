"""Each family's pipeline defaults, read from the installed diffusers: for the light side's table.

The light side (`farm`) never imports torch, yet it has to tell a user what a job of each family
will do when a field is left out: which pipeline diffusers' AutoPipelines pick for txt2img,
img2img and inpaint, how many steps and what guidance and strength its `__call__` defaults to,
which family-only arguments it takes (SDXL's second prompt and micro-conditioning sizes, SD3's
third prompt, FLUX.1's `true_cfg_scale`…), whether img2img takes a size at all, and which
schedulers can replace the family's own. Rather than copy those by hand, `family_defaults()`
reads them with `inspect.signature` here, on the heavy side; its output is what the light
table (`farm.jobs.families`) is written from, and tests/workers/models/test_families.py checks
that table against diffusers itself whenever diffusers is upgraded.

    $ python -m workers.builtin.defaults       # prints the table
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from diffusers import DiffusionPipeline
from diffusers.pipelines.auto_pipeline import (
    AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    AUTO_INPAINT_PIPELINES_MAPPING,
    AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
)

from farm.jobs.families import FAMILY_ARGS

FAMILIES: dict[str, tuple[str, str]] = {
    "sd15": ("stable-diffusion", "tiny"),
    "sdxl": ("stable-diffusion-xl", "tiny-sdxl"),
    "sd3": ("stable-diffusion-3", "tiny-sd3"),
    "flux": ("flux", "tiny-flux"),
}
"""Family → (its key in diffusers' AutoPipeline mappings, the built-in whose scheduler is read)."""

KINDS = {
    "txt2img": AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
    "img2img": AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    "inpaint": AUTO_INPAINT_PIPELINES_MAPPING,
}
COMMON = ("num_inference_steps", "guidance_scale", "strength")
FAMILY_ONLY = FAMILY_ARGS
EXTRA_PIPELINES = {("flux", "inpaint-fill"): "FluxFillPipeline"}
"""Pipelines a family's dedicated models use that no AutoPipeline maps to (FLUX.1-Fill-dev)."""


def family_defaults() -> dict[str, Any]:
    """{family: {kind: {pipeline, defaults, family_args, takes_size}, "scheduler": {...}}}.

    `defaults` holds `__call__`'s defaults for `num_inference_steps`, `guidance_scale` and
    `strength` where it takes them; `family_args` the family-only arguments it takes, with their
    defaults; `takes_size` whether it takes `height` and `width`. `scheduler` names the family's
    built-in's scheduler and the classes in its `compatibles`.
    """
    import diffusers

    table: dict[str, Any] = {}
    for family, (key, builtin) in FAMILIES.items():
        entry: dict[str, Any] = {}
        for kind, mapping in KINDS.items():
            entry[kind] = _describe(mapping[key])
        for (extra_family, kind), class_name in EXTRA_PIPELINES.items():
            if extra_family == family:
                entry[kind] = _describe(getattr(diffusers, class_name))
        scheduler = _builtin_scheduler(builtin)
        entry["scheduler"] = {
            "default": type(scheduler).__name__,
            "compatibles": sorted(cls.__name__ for cls in scheduler.compatibles),
        }
        table[family] = entry
    return table


def _describe(pipeline_class: type[DiffusionPipeline]) -> dict[str, Any]:
    params = inspect.signature(pipeline_class.__call__).parameters
    return {
        "pipeline": pipeline_class.__name__,
        "defaults": {name: params[name].default for name in COMMON if name in params},
        "family_args": {name: params[name].default for name in FAMILY_ONLY if name in params},
        "takes_size": "height" in params and "width" in params,
    }


def _builtin_scheduler(name: str) -> Any:
    if name == "tiny":
        from workers.builtin.tiny import build_tiny

        return build_tiny(name).scheduler
    from workers.builtin.families import build_family_tiny

    return build_family_tiny(name).scheduler


if __name__ == "__main__":
    print(json.dumps(family_defaults(), indent=1, default=repr))
