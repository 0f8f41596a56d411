"""A render spec resolved against its model: checked to fit, every left-out field filled in.

A job's fields are diffusers' arguments, and a field left out must mean what leaving the
argument out of that model's pipeline means: SDXL's guidance 5.0 and img2img strength 0.3,
SD3's 28 steps, FLUX.1's guidance 3.5 and 256-token... each family its own
(`farm.jobs.families`). `resolve` writes those values into the spec, so the record, its batch
signature and meta.json say what was rendered with, and a job that left a field out shares a
pipeline call with one that gave the same value. It runs at submit where the client can see
the model (built-ins, local folders and files, the local Hugging Face cache), else on the
worker, before the render, with the loaded pipeline's own `ModelInfo`.

    >>> spec = resolve(Txt2Img(model="tiny-sdxl", prompt="a fox"), BUILTIN_INFO["tiny-sdxl"])
    >>> spec.guidance_scale, spec.height, spec.crops_coords_top_left
    (5.0, 64, (0, 0))

What does not fit is refused with one line naming the field (`InvalidJob`): a kind the model
does not run, an argument its pipeline does not take, a scheduler that does not run with it
(with the list of those that do), a size that is not a multiple of what it needs.

1. The kind: the model runs it (a 9-channel or Fill model runs inpaint only).
2. The arguments: each family argument set is one the pipeline takes; a refiner only where
   there is a `denoising_end` to hand over at.
3. The scheduler: one of the pipeline's, by its canonical name.
4. Sizes: explicit ones are multiples of the model's `size_multiple`.
5. Defaults: `num_inference_steps`, `guidance_scale`, `strength`, family arguments with a
   value of their own (`crops_coords_top_left`, `aesthetic_score`, `true_cfg_scale`,
   `max_sequence_length`…), txt2img's height and width, a refiner's own.
"""

from __future__ import annotations

from typing import Any, TypeVar

from farm.errors import InvalidJob
from farm.jobs.families import FAMILY_ARGS, OPTIONAL_ARGS, ModelInfo, Pipeline
from farm.jobs.specs import Img2Img, Inpaint, Txt2Img, left_out

S = TypeVar("S", Txt2Img, Img2Img, Inpaint)


def resolve(spec: S, info: ModelInfo, refiner: ModelInfo | None = None) -> S:
    """`spec` checked against `info` (its model) and with every left-out field at that model's
    pipeline default; `refiner` is the refiner's, where the job has one and it is known."""
    # 1. The kind.
    info.check_kind(spec.kind, spec.model)
    pipeline = info.pipeline_for(spec.kind)
    # 2. The arguments its pipeline takes.
    for name in OPTIONAL_ARGS:
        if getattr(spec, name, None) is not None and name not in pipeline.args:
            takes = [a for a in pipeline.args if a in FAMILY_ARGS]
            raise InvalidJob(
                f"{name}: {spec.model!r} is {info.describe()}, whose {spec.kind} pipeline takes "
                f"no {name} ({_listed('family arguments', takes)})",
                field=name,
            )
    updates: dict[str, Any] = {}
    if spec.refiner is not None:
        updates["refiner"] = _refiner(spec, info, pipeline, refiner)
    # 3. The scheduler.
    if spec.scheduler is not None:
        updates["scheduler"] = scheduler_name(spec.scheduler, info, spec.kind, spec.model)
    # 4. Sizes.
    multiple = info.size_multiple
    for name in ("height", "width"):
        value = getattr(spec, name)
        if value is not None and value % multiple:
            raise InvalidJob(
                f"{name}: must be a multiple of {multiple} for {info.describe()}, got {value}",
                field=name,
            )
    # 5. Defaults: the pipeline's own.
    gone = left_out(spec)
    updates.update({k: v for k, v in pipeline.defaults.items() if k in gone})
    for name, default in pipeline.args.items():
        if default is not None and getattr(spec, name, None) is None:
            updates[name] = default
    if spec.kind == "txt2img" and info.default_size is not None:
        for name in ("height", "width"):
            if getattr(spec, name) is None:
                updates[name] = info.default_size
    resolved = spec.model_copy(update=updates) if updates else spec
    _check_steps(resolved, info)
    return resolved


def _check_steps(spec: Any, info: ModelInfo) -> None:
    """SD and SDXL img2img and inpaint run int(steps × strength) steps: refuse none at all
    (diffusers would fail inside the call); SD3 and FLUX.1 always run at least one."""
    strength = getattr(spec, "strength", None)
    if strength is None or info.family not in ("sd", "sdxl") or spec.denoising_start is not None:
        return
    if int(spec.num_inference_steps * strength) < 1:
        raise InvalidJob(
            f"strength: {strength:g} of {spec.num_inference_steps} steps runs no denoising step "
            f"on {info.describe()}; raise strength or num_inference_steps",
            field="strength",
        )


def scheduler_name(name: str, info: ModelInfo, kind: str, ref: str) -> str:
    """The farm's canonical name for scheduler `name` on this model's `kind` pipeline, or
    `InvalidJob` listing the ones that fit."""
    pipeline = info.pipeline_for(kind)
    choice = info.traits.scheduler(name)
    if choice is not None and choice.name in pipeline.schedulers:
        return choice.name
    raise InvalidJob(
        f"scheduler: {name!r} does not fit {ref!r}, {info.describe()}; its {kind} pipeline "
        f"{pipeline.class_name} runs {', '.join(pipeline.schedulers)}",
        field="scheduler",
    )


def _refiner(spec: Any, info: ModelInfo, pipeline: Pipeline, refiner: ModelInfo | None) -> Any:
    """The job's refiner checked against the base (and, where known, the refiner model), with
    its defaults filled in."""
    if "denoising_end" not in pipeline.args:
        raise InvalidJob(
            f"refiner: {spec.model!r} is {info.describe()}; a base → refiner render is SDXL's",
            field="refiner",
        )
    if spec.denoising_end is None:
        raise InvalidJob(
            "denoising_end: a refiner needs the fraction of the steps the base runs "
            "(diffusers' docs use 0.8)",
            field="denoising_end",
        )
    ref = spec.refiner
    updates: dict[str, Any] = {}
    if ref.denoising_start is None:
        updates["denoising_start"] = spec.denoising_end
    if refiner is not None:
        kind = "inpaint" if spec.kind == "inpaint" else "img2img"
        if refiner.family != "sdxl":
            raise InvalidJob(
                f"refiner: {ref.model!r} is {refiner.describe()}, not an SDXL model",
                field="refiner",
            )
        refiner.check_kind(kind, ref.model, field="refiner")
        second = refiner.pipeline_for(kind)
        for name in ("guidance_scale", "aesthetic_score", "negative_aesthetic_score"):
            if getattr(ref, name) is None:
                updates[name] = second.defaults.get(name, second.args.get(name))
    return ref.model_copy(update=updates) if updates else ref


def _listed(what: str, names: list[str]) -> str:
    return f"its {what}: {', '.join(names)}" if names else f"it takes no {what}"
