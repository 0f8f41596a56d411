"""Render jobs → images: txt2img, img2img, inpaint or style, one diffusers pipeline call per batch.

Pure compute: no Redis, no storage. The caller decodes the inputs, gets a warm pipeline from
`PipelineCache`, and stores what comes back. The call is the one a diffusers user would write
by hand, with the same argument names and values, so the farm's pixels equal diffusers' own:

    >>> pipe = cache.get(spec.model, spec.kind)
    >>> result = render(pipe, spec, image, mask, on_step=lambda step, total: cancelled())
    >>> results = render_batch(pipe, specs, images, masks)    # compatible jobs, one call

A style job is img2img with an IP-Adapter: `pipe` is the adapter's pipeline
(`workers.render.ip_adapter.load_for`), attached for the call, and `ip_adapter_image` the reference
image the batch shares.

Determinism: image i of a job is drawn from its own `torch.Generator("cpu").manual_seed(seed + i)`,
so its pixels depend on the spec and seed only, never on what else shares the call.

Sizes: the pipeline renders at the working size (`farm.jobs.signature.working_size`: the spec's
height/width, else the input's size rounded down to a multiple of 8). Without an explicit size
the outputs come back at the input's own size; `preserve_unmasked` always does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageFilter

from farm.errors import InvalidJob
from farm.jobs.signature import batch_signature, working_size
from farm.jobs.specs import SCHEDULERS, Img2Img, Inpaint, Txt2Img

Spec = Txt2Img | Img2Img | Inpaint

StepCallback = Callable[[int, int], bool | None]
"""`on_step(step, total)` after each denoising step; returning True cancels the render."""

PreviewCallback = Callable[[int, int, dict[int, Image.Image]], None]
"""`on_preview(step, total, {job index: picture})` after a step that is a multiple of some
job's `preview_every` (`workers.render.previews`: the latents, mapped to RGB)."""


@dataclass
class RenderResult:
    images: list[Image.Image]
    mask_used: Image.Image | None
    """The mask exactly as the model used it (dilated, blurred, resized, binarised), L mode at
    the working size."""
    interrupted: bool
    steps: int
    """Denoising steps run (fewer than the total when interrupted)."""
    height: int
    width: int
    """The working size the model rendered at (outputs may be at the input's own size)."""
    nsfw_content_detected: list[bool] | None = None
    """From the model's safety checker, when it has one."""


def render(
    pipe: DiffusionPipeline,
    spec: Spec,
    image: Image.Image | None = None,
    mask: Image.Image | None = None,
    *,
    on_step: StepCallback | None = None,
) -> RenderResult:
    """Run `spec` on `pipe` (from `PipelineCache.get(spec.model, spec.kind)`): a batch of one."""
    return render_batch(pipe, [spec], [image], [mask], on_step=on_step)[0]


def render_batch(
    pipe: DiffusionPipeline,
    specs: Sequence[Spec],
    images: Sequence[Image.Image | None] | None = None,
    masks: Sequence[Image.Image | None] | None = None,
    *,
    on_step: StepCallback | None = None,
    ip_adapter: Any = None,
    ip_adapter_image: Image.Image | None = None,
    on_preview: PreviewCallback | None = None,
) -> list[RenderResult]:
    """Run jobs that share one batch signature as one pipeline call; one result per job.

    A batch of one is exactly the call a diffusers user writes for that job. A larger batch
    passes lists, one entry per image (prompts, negative prompts, images, masks) and one
    generator per image, so every image's pixels are the ones it gets alone.
    """
    # 1. Check inputs: the images each job's kind needs, already decoded; one signature.
    n_jobs = len(specs)
    images = list(images) if images is not None else [None] * n_jobs
    masks = list(masks) if masks is not None else [None] * n_jobs
    if not n_jobs or len(images) != n_jobs or len(masks) != n_jobs:
        raise ValueError("render_batch needs one spec, and one image and mask slot, per job")
    for i, spec in enumerate(specs):
        images[i], masks[i] = _check_inputs(spec, images[i], masks[i])
    lead, n_per_job = specs[0], specs[0].num_images_per_prompt
    if n_jobs > 1:
        signatures = {
            batch_signature(s, im and im.size) for s, im in zip(specs, images, strict=True)
        }
        if len(signatures) != 1 or None in signatures:
            raise ValueError("render_batch runs jobs of one batch signature only")
    kind = "img2img" if lead.kind == "style" else lead.kind
    if lead.kind == "style" and (ip_adapter is None or ip_adapter_image is None):
        raise InvalidJob("style needs its IP-Adapter and ip_adapter_image", field="ip_adapter")

    # 2. The working size, shared by the batch.
    height, width = working_size(lead, images[0] and images[0].size)

    # 3. Inputs as the model takes them: img2img images at the working size (its pipeline has
    #    no height/width), inpaint masks dilated then blurred as each job asks.
    model_images = images
    if kind == "img2img":
        model_images = [
            im if im.size == (width, height) else pipe.image_processor.resize(im, height, width)
            for im in images
        ]
    if kind == "inpaint":
        masks = [_shape_mask(pipe, spec, m) for spec, m in zip(specs, masks, strict=True)]

    # 4. Scheduler: the batch's own, built from the model's default config (None: the default).
    scheduler = make_scheduler(lead.scheduler, pipe.scheduler)

    # 5. One generator per image, so an image's noise does not depend on its neighbours.
    generator = [
        torch.Generator("cpu").manual_seed(_seed(spec) + i)
        for spec in specs
        for i in range(n_per_job)
    ]

    # 6. Arguments, named and valued as diffusers' own.
    kwargs: dict[str, Any] = {
        "num_inference_steps": lead.num_inference_steps,
        "guidance_scale": lead.guidance_scale,
        "generator": generator,
        "output_type": "pil",
    }
    if n_jobs == 1:
        kwargs.update(
            prompt=lead.prompt,
            negative_prompt=lead.negative_prompt,
            num_images_per_prompt=n_per_job,
        )
    else:
        kwargs.update(
            prompt=[s.prompt for s in specs for _ in range(n_per_job)],
            negative_prompt=_negative_prompts(specs, n_per_job),
            num_images_per_prompt=1,
        )
    if kind != "txt2img":
        kwargs.update(_per_image(image=model_images, n_jobs=n_jobs, n=n_per_job))
        kwargs.update(strength=lead.strength)
    if kind == "inpaint":
        kwargs.update(_per_image(mask_image=masks, n_jobs=n_jobs, n=n_per_job))
        kwargs.update(padding_mask_crop=lead.padding_mask_crop)
    if kind != "img2img":
        kwargs.update(height=height, width=width)
    if lead.kind == "style":  # one reference image for the whole batch (in its signature)
        kwargs.update(ip_adapter_image=ip_adapter_image.convert("RGB"))

    # 7. Progress and cancellation, after each denoising step.
    progress = {"steps": 0, "interrupted": False}

    every = [getattr(spec, "preview_every", None) for spec in specs]

    def callback_on_step_end(p: DiffusionPipeline, i: int, t: Any, tensors: dict) -> dict:
        progress["steps"] = i + 1
        due = [j for j, n in enumerate(every) if n and (i + 1) % n == 0]
        if on_preview is not None and due and tensors.get("latents") is not None:
            from workers.render.previews import preview

            shown = preview(p, tensors["latents"], height, width)  # reads the latents only
            if shown:
                on_preview(i + 1, p.num_timesteps, {j: shown[j * n_per_job] for j in due})
        if on_step is not None and on_step(i + 1, p.num_timesteps):
            p._interrupt = True
            progress["interrupted"] = True
        return tensors

    # 8. Denoise and decode, with the batch's scheduler (and a style job's IP-Adapter at its
    #    scale) in place for this call only.
    attached = ip_adapter.attached(lead.ip_adapter_scale) if lead.kind == "style" else nullcontext()
    default_scheduler = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        with attached:
            out = pipe(**kwargs, callback_on_step_end=callback_on_step_end)
    finally:
        pipe.scheduler = default_scheduler
    if height is None or width is None:  # txt2img at the model's default size
        width, height = out.images[0].size

    # 9. Each job's results: at the input's size, the source kept outside the mask if asked,
    #    with the mask as the model saw it.
    nsfw = getattr(out, "nsfw_content_detected", None)
    results = []
    for j, spec in enumerate(specs):
        part = slice(j * n_per_job, (j + 1) * n_per_job)
        mask_used = None
        if kind == "inpaint":
            processed = pipe.mask_processor.preprocess(masks[j], height=height, width=width)
            mask_used = pipe.mask_processor.postprocess(processed, output_type="pil")[0]
            mask_used = mask_used.convert("L")
        results.append(
            RenderResult(
                images=[_finish(spec, im, images[j], masks[j]) for im in out.images[part]],
                mask_used=mask_used,
                interrupted=progress["interrupted"],
                steps=progress["steps"],
                height=height,
                width=width,
                nsfw_content_detected=nsfw[part] if nsfw is not None else None,
            )
        )
    return results


def _check_inputs(
    spec: Spec, image: Image.Image | None, mask: Image.Image | None
) -> tuple[Image.Image | None, Image.Image | None]:
    kind = spec.kind
    if kind not in ("txt2img", "img2img", "inpaint", "style"):
        raise InvalidJob(
            f"render runs txt2img, img2img, inpaint and style jobs, not {kind!r}", field="kind"
        )
    if kind in ("img2img", "inpaint", "style") and image is None:
        raise InvalidJob(f"{kind} needs an image", field="image")
    if kind == "inpaint" and mask is None:
        raise InvalidJob("inpaint needs a mask_image", field="mask_image")
    if image is not None and image.mode != "RGB":
        image = image.convert("RGB")
    if mask is not None and mask.mode != "L":
        mask = mask.convert("L")
    return image, mask


def _seed(spec: Spec) -> int:
    return 0 if spec.seed is None else spec.seed


def _negative_prompts(specs: Sequence[Spec], n: int) -> list[str] | None:
    """One per image; None where no job has one (diffusers' "" for each, as alone)."""
    if all(s.negative_prompt is None for s in specs):
        return None
    return [s.negative_prompt or "" for s in specs for _ in range(n)]


def _per_image(*, n_jobs: int, n: int, **named: list[Any]) -> dict[str, Any]:
    """A batch of one passes its one input as it is; a batch passes one entry per image."""
    ((name, values),) = named.items()
    if n_jobs == 1:
        return {name: values[0]}
    return {name: [v for v in values for _ in range(n)]}


def _shape_mask(pipe: DiffusionPipeline, spec: Inpaint, mask: Image.Image) -> Image.Image:
    """The mask the job asks for, at the input's size: grown by `mask_dilate` pixels (a
    square max filter), then blurred by `mask_blur` with diffusers' own `mask_processor.blur`."""
    if spec.mask_dilate:
        mask = mask.filter(ImageFilter.MaxFilter(2 * spec.mask_dilate + 1))
    if spec.mask_blur:
        mask = pipe.mask_processor.blur(mask, blur_factor=spec.mask_blur)
    return mask


def _finish(
    spec: Spec, out: Image.Image, image: Image.Image | None, mask: Image.Image | None
) -> Image.Image:
    """One output at the input's own size, composited over the source if the job asks.

    With `padding_mask_crop`, diffusers has already pasted the crop back over the source.
    """
    if image is None:
        return out
    preserve = getattr(spec, "preserve_unmasked", False)
    if (preserve or (spec.height is None and spec.width is None)) and out.size != image.size:
        out = out.resize(image.size, Image.Resampling.LANCZOS)
    if preserve and spec.padding_mask_crop is None:
        out = Image.composite(out, image, mask)  # mask 0: the source pixel, exactly
    return out


def make_scheduler(name: str | None, default: Any) -> Any:
    """A fresh scheduler: `name` from `farm.jobs.specs.SCHEDULERS`, configured from the model's default.

    None gives a fresh copy of the default itself, so no state carries over between jobs.
    """
    if name is None:
        return type(default).from_config(default.config)
    if name not in SCHEDULERS:
        raise InvalidJob(
            f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}", field="scheduler"
        )
    class_name, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(default.config, **extra)
