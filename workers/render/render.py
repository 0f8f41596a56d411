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

Families: each job is first resolved against its model (`farm.jobs.defaults.resolve`, with the
`ModelInfo` of the loaded pipeline): SD 1.x/2.x, SDXL, SD3 and FLUX.1 each get their own
pipeline per kind, their own defaults for whatever the job left out, their own arguments
(`workers.render.arguments`) and schedulers (`workers.models.families.make_scheduler`); an
SDXL job with a refiner runs the base to `denoising_end` and the refiner from there.

Sizes: the pipeline renders at the working size (`farm.jobs.signature.working_size`: the spec's
height/width, else the input's size rounded down to a multiple of 8, or 16 for SD3 and FLUX.1;
txt2img without a size: the model's default). img2img passes it as height/width where its
pipeline takes them (SD3, FLUX.1), else resizes the input to it. Without an explicit size the
outputs come back at the input's own size; `preserve_unmasked` always does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageFilter

from farm.errors import InvalidJob
from farm.jobs.defaults import resolve
from farm.jobs.families import ModelInfo
from farm.jobs.signature import batch_signature, working_size
from farm.jobs.specs import Img2Img, Inpaint, Txt2Img
from workers.models.families import info_of, make_scheduler
from workers.render import arguments

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
    spec: Any = None
    """The job as rendered: resolved against the model, every default it took written in
    (what the record and meta.json keep, so the result can be reproduced)."""


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
    info: ModelInfo | None = None,
    refiner: DiffusionPipeline | None = None,
) -> list[RenderResult]:
    """Run jobs that share one batch signature as one pipeline call; one result per job.

    A batch of one is exactly the call a diffusers user writes for that job. A larger batch
    passes lists, one entry per image (prompts, negative prompts, images, masks) and one
    generator per image, so every image's pixels are the ones it gets alone. `info` is what
    the model is (`PipelineCache.info`; else read from `pipe`); `refiner`, an SDXL refiner's
    pipeline for jobs that name one (`PipelineCache.get(spec.refiner.model, …)`).
    """
    # 1. Check inputs: the images each job's kind needs, already decoded.
    n_jobs = len(specs)
    images = list(images) if images is not None else [None] * n_jobs
    masks = list(masks) if masks is not None else [None] * n_jobs
    if not n_jobs or len(images) != n_jobs or len(masks) != n_jobs:
        raise ValueError("render_batch needs one spec, and one image and mask slot, per job")
    for i, spec in enumerate(specs):
        images[i], masks[i] = _check_inputs(spec, images[i], masks[i])

    # 2. Resolve each job against its model (`farm.jobs.defaults`): its kind, arguments,
    #    scheduler and sizes checked, every field left out at this model's own default (a job
    #    resolved at submit comes through unchanged); then one signature for all.
    info = info or info_of(pipe)
    if specs[0].refiner is not None and refiner is None:
        raise InvalidJob("a refiner job needs its refiner's pipeline", field="refiner")
    refiner_info = info_of(refiner) if refiner is not None else None
    specs = [resolve(spec, info, refiner_info) for spec in specs]
    lead, n_per_job = specs[0], specs[0].num_images_per_prompt
    if n_jobs > 1:
        signatures = {
            batch_signature(s, im and im.size, info) for s, im in zip(specs, images, strict=True)
        }
        if len(signatures) != 1 or None in signatures:
            raise ValueError("render_batch runs jobs of one batch signature only")
    kind = "img2img" if lead.kind == "style" else lead.kind
    pipeline = info.pipeline_for(kind)
    if lead.kind == "style" and (ip_adapter is None or ip_adapter_image is None):
        raise InvalidJob("style needs its IP-Adapter and ip_adapter_image", field="ip_adapter")

    # 3. The working size, shared by the batch (a multiple of what the model needs).
    height, width = working_size(lead, images[0] and images[0].size, info.size_multiple)

    # 4. Inputs as the model takes them: img2img images at the working size where its
    #    pipeline takes no height/width (SD, SDXL), inpaint masks dilated then blurred as each
    #    job asks.
    model_images = images
    if kind == "img2img" and not pipeline.takes_size:
        model_images = [
            im if im.size == (width, height) else pipe.image_processor.resize(im, height, width)
            for im in images
        ]
    if kind == "inpaint":
        masks = [_shape_mask(pipe, spec, m) for spec, m in zip(specs, masks, strict=True)]

    # 5. Scheduler: the batch's own, as the family means its name, built from the model's
    #    default config (None: the default).
    scheduler = make_scheduler(lead.scheduler, pipe.scheduler, info)

    # 6. One generator per image, so an image's noise does not depend on its neighbours.
    generator = [
        torch.Generator("cpu").manual_seed(_seed(spec) + i)
        for spec in specs
        for i in range(n_per_job)
    ]

    # 7. Arguments, named and valued as diffusers' own, and only those its pipeline takes.
    kwargs: dict[str, Any] = {
        "num_inference_steps": lead.num_inference_steps,
        "guidance_scale": lead.guidance_scale,
        "generator": generator,
        "output_type": "pil",
        "num_images_per_prompt": n_per_job if n_jobs == 1 else 1,
        **arguments.prompts(specs, pipeline, n_per_job),
        **arguments.shared(lead, pipeline),
    }
    if kind != "txt2img":
        kwargs.update(image=arguments.per_image(model_images, n_jobs, n_per_job))
        kwargs.update(strength=lead.strength)
    if kind == "inpaint":
        kwargs.update(mask_image=arguments.per_image(masks, n_jobs, n_per_job))
        if "padding_mask_crop" in pipeline.args:
            kwargs.update(padding_mask_crop=lead.padding_mask_crop)
    if pipeline.takes_size:
        kwargs.update(height=height, width=width)
    if lead.kind == "style":  # one reference image for the whole batch (in its signature)
        kwargs.update(ip_adapter_image=ip_adapter_image.convert("RGB"))

    # 8. Progress and cancellation, after each denoising step (of both stages, with a refiner).
    progress = {"steps": 0, "offset": 0, "interrupted": False}

    every = [getattr(spec, "preview_every", None) for spec in specs]

    def callback_on_step_end(p: DiffusionPipeline, i: int, t: Any, tensors: dict) -> dict:
        progress["steps"] = progress["offset"] + i + 1
        total = p.num_timesteps  # the steps this call runs (strength or a refiner cut them)
        if lead.refiner is not None:  # both stages: about the job's steps in all
            total = max(lead.num_inference_steps, progress["steps"])
        due = [j for j, n in enumerate(every) if n and progress["steps"] % n == 0]
        if on_preview is not None and due and tensors.get("latents") is not None:
            from workers.render.previews import preview

            shown = preview(p, tensors["latents"], height, width)  # reads the latents only
            if shown:
                on_preview(progress["steps"], total, {j: shown[j * n_per_job] for j in due})
        if on_step is not None and on_step(progress["steps"], total):
            p._interrupt = True
            progress["interrupted"] = True
        return tensors

    # 9. Denoise and decode, with the batch's scheduler (and a style job's IP-Adapter at its
    #    scale) in place for this call only; with a refiner, the base hands over its latents.
    attached = ip_adapter.attached(lead.ip_adapter_scale) if lead.kind == "style" else nullcontext()
    if lead.refiner is not None:
        kwargs["output_type"] = "latent"
    with _scheduler(pipe, scheduler), attached:
        out = pipe(**kwargs, callback_on_step_end=callback_on_step_end)
    outputs = out.images
    if refiner is not None and refiner_info is not None and not progress["interrupted"]:
        progress["offset"] = progress["steps"]
        second = _refiner_arguments(lead, refiner_info, kind, kwargs, outputs)
        with _scheduler(refiner, make_scheduler(lead.scheduler, refiner.scheduler, refiner_info)):
            outputs = refiner(**second, callback_on_step_end=callback_on_step_end).images
    if progress["interrupted"] and lead.refiner is not None:
        outputs = []  # latents, not pictures: an interrupted job keeps no outputs anyway
    if (height is None or width is None) and outputs:  # txt2img at the model's default size
        width, height = outputs[0].size

    # 10. Each job's results: at the input's size, the source kept outside the mask if asked,
    #     with the mask as the model saw it.
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
                images=[_finish(spec, im, images[j], masks[j]) for im in outputs[part]],
                mask_used=mask_used,
                interrupted=progress["interrupted"],
                steps=progress["steps"],
                height=height or 0,
                width=width or 0,
                nsfw_content_detected=nsfw[part] if nsfw is not None else None,
                spec=spec,
            )
        )
    return results


@contextmanager
def _scheduler(pipe: DiffusionPipeline, scheduler: Any) -> Iterator[None]:
    """`pipe` with `scheduler` for one call; its own one back after it, whatever happens."""
    default, pipe.scheduler = pipe.scheduler, scheduler
    try:
        yield
    finally:
        pipe.scheduler = default


def _refiner_arguments(
    lead: Spec, info: ModelInfo, kind: str, base: dict[str, Any], latents: Any
) -> dict[str, Any]:
    """The refiner's call: the base's prompts, generators and conditioning, its latents as the
    image, from `denoising_start` on (diffusers' "ensemble of expert denoisers")."""
    assert lead.refiner is not None
    pipeline = info.pipeline_for("inpaint" if kind == "inpaint" else "img2img")
    keep = ("prompt", "num_inference_steps", "generator", "num_images_per_prompt", "mask_image")
    keep += tuple(a for a in base if a in pipeline.args and a != "denoising_end")
    if pipeline.takes_size:
        keep += ("height", "width")
    refined = lead.refiner
    return {
        **{k: v for k, v in base.items() if k in keep},
        "image": latents,
        "denoising_start": refined.denoising_start,
        "guidance_scale": refined.guidance_scale,
        "aesthetic_score": refined.aesthetic_score,
        "negative_aesthetic_score": refined.negative_aesthetic_score,
        "output_type": "pil",
    }


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
