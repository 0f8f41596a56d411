"""The family table (`farm.jobs.families`) on the heavy side: what a loaded pipeline is, the
pipeline each kind of job runs on it, and schedulers built the way its family needs them.

    >>> info = info_of(pipe)                       # ModelInfo(family='flux', pipeline='FluxPipeline', …)
    >>> img2img = derive(pipe, info, "img2img")    # FluxImg2ImgPipeline over the same weights
    >>> pipe.scheduler = make_scheduler("dpmpp_2m", pipe.scheduler, info)   # flow sigmas

The light side reads the same facts from a model's files; here they come from the pipeline
itself, so a job whose model the client could not see is resolved against exactly what the
worker loaded.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import diffusers
from diffusers import DiffusionPipeline

from farm.errors import InvalidJob
from farm.jobs.families import FAMILIES, ModelInfo, family_of_class


def info_of(pipe: DiffusionPipeline, ref: str = "") -> ModelInfo:
    """What a loaded pipeline is; `InvalidJob` for a pipeline of no family the farm renders."""
    class_name = type(pipe).__name__
    family = family_of_class(class_name)
    if family is None:
        names = ", ".join(f"{f.name} ({f.title})" for f in FAMILIES.values())
        raise InvalidJob(
            f"model {ref!r}: {class_name} is of no family the farm renders ({names})",
            field="model",
        )
    denoiser = denoiser_of(pipe)
    config = denoiser.config if denoiser is not None else {}
    vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
    sample = getattr(pipe, "default_sample_size", None) or config.get("sample_size")
    if isinstance(sample, list | tuple):
        sample = sample[0]
    return ModelInfo(
        family.name,
        class_name,
        config.get("in_channels"),
        sample * vae_scale if isinstance(sample, int) else None,
        vae_scale,
        text_encoder=getattr(pipe, "text_encoder", None) is not None,
    )


def denoiser_of(pipe: DiffusionPipeline) -> Any:
    """The module that denoises: the UNet, or the transformer (SD3, FLUX.1)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else getattr(pipe, "transformer", None)


def derive(base: DiffusionPipeline, info: ModelInfo, kind: str) -> DiffusionPipeline:
    """The pipeline that runs `kind` on `base`'s weights (diffusers' `from_pipe`): the class
    the family table names (what diffusers' AutoPipelines pick, or the model's own)."""
    class_name = info.pipeline_for(kind).class_name
    if class_name == type(base).__name__:
        return base
    pipe = getattr(diffusers, class_name).from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_TEMPLATES: weakref.WeakKeyDictionary[Any, dict[tuple[str | None, str], Any]] = (
    weakref.WeakKeyDictionary()
)
"""Per model's own scheduler: the schedulers built from it, never stepped, to copy."""


def make_scheduler(name: str | None, default: Any, info: ModelInfo | None = None) -> Any:
    """A fresh scheduler: `name` as the model's family means it, configured from the model's
    own (`default`'s) config; None gives a fresh copy of the default, so no state carries
    over between jobs. A flow-matching solver (`Scheduler.flow`) gets flow sigmas and the
    model's shift, as diffusers' docs configure DPM++ and UniPC for flow-matching models.

    Each is built once per model and name and copied for every call: a copy of a scheduler
    that never stepped is as fresh as a new one, and `from_config` (which validates the
    config against the class's signature each time) costs several times more, on the render
    thread, between two pipeline calls."""
    templates = _TEMPLATES.setdefault(default, {})
    key = (name, info.family if info is not None else "sd")
    if key not in templates:
        templates[key] = _build_scheduler(name, default, info)
    return copy.deepcopy(templates[key])


def _build_scheduler(name: str | None, default: Any, info: ModelInfo | None) -> Any:
    if name is None:
        return type(default).from_config(default.config)
    family = FAMILIES[info.family if info is not None else "sd"]
    choice = family.scheduler(name)
    if choice is None:
        raise InvalidJob(
            f"scheduler: {name!r} is not one of {family.name}'s ({', '.join(family.schedulers)})",
            field="scheduler",
        )
    config = dict(choice.config)
    if choice.flow:
        config["flow_shift"] = default.config.get("shift", 1.0)
    return getattr(diffusers, choice.class_name).from_config(default.config, **config)
