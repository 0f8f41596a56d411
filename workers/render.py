"""One render job → images: txt2img, img2img or inpaint, as one diffusers pipeline call.

Pure compute: no Redis, no storage. The caller decodes the inputs, gets a warm pipeline from
`PipelineCache`, and stores what comes back. The call is the one a diffusers user would write
by hand, with the same argument names and values, so the farm's pixels equal diffusers' own:

    >>> pipe = cache.get(spec.model, spec.kind)
    >>> result = render(pipe, spec, image, mask, on_step=lambda step, total: cancelled())

Determinism: image i of a job is drawn from its own `torch.Generator("cpu").manual_seed(seed + i)`,
so its pixels depend on the spec and seed only, never on what else shares the call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from farm.errors import InvalidJob
from farm.jobs import SCHEDULERS, Img2Img, Inpaint, Txt2Img

StepCallback = Callable[[int, int], bool | None]
"""`on_step(step, total)` after each denoising step; returning True cancels the render."""


@dataclass
class RenderResult:
    images: list[Image.Image]
    mask_used: Image.Image | None
    """The mask exactly as the model used it (resized, binarised), L mode at the working size."""
    interrupted: bool
    steps: int
    """Denoising steps run (fewer than the total when interrupted)."""
    height: int
    width: int
    nsfw_content_detected: list[bool] | None = None
    """From the model's safety checker, when it has one."""


def render(
    pipe: DiffusionPipeline,
    spec: Txt2Img | Img2Img | Inpaint,
    image: Image.Image | None = None,
    mask: Image.Image | None = None,
    *,
    on_step: StepCallback | None = None,
) -> RenderResult:
    """Run `spec` on `pipe` (from `PipelineCache.get(spec.model, spec.kind)`)."""
    # 1. Check inputs: the images the job kind needs, already decoded.
    kind = spec.kind
    if kind not in ("txt2img", "img2img", "inpaint"):
        raise InvalidJob(
            f"render runs txt2img, img2img and inpaint jobs, not {kind!r}", field="kind"
        )
    if kind in ("img2img", "inpaint") and image is None:
        raise InvalidJob(f"{kind} needs an image", field="image")
    if kind == "inpaint" and mask is None:
        raise InvalidJob("inpaint needs a mask_image", field="mask_image")
    if image is not None and image.mode != "RGB":
        image = image.convert("RGB")
    if mask is not None and mask.mode != "L":
        mask = mask.convert("L")

    # 2. Scheduler: the job's own, built from the model's default config (None: the default).
    scheduler = make_scheduler(spec.scheduler, pipe.scheduler)

    # 3. One generator per image, so an image's noise does not depend on its neighbours.
    seed = 0 if spec.seed is None else spec.seed
    generator = [
        torch.Generator("cpu").manual_seed(seed + i) for i in range(spec.num_images_per_prompt)
    ]

    # 4. Arguments, named and valued as diffusers' own.
    kwargs: dict[str, Any] = {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "num_inference_steps": spec.num_inference_steps,
        "guidance_scale": spec.guidance_scale,
        "num_images_per_prompt": spec.num_images_per_prompt,
        "generator": generator,
        "output_type": "pil",
    }
    if kind == "img2img":
        # StableDiffusionImg2ImgPipeline has no height/width: the image's size is the output's.
        if spec.height is not None or spec.width is not None:
            height = spec.height or image.height
            width = spec.width or image.width
            image = pipe.image_processor.resize(image, height=height, width=width)
        kwargs.update(image=image, strength=spec.strength)
    else:
        kwargs.update(height=spec.height, width=spec.width)
    if kind == "inpaint":
        kwargs.update(image=image, mask_image=mask, strength=spec.strength)

    # 5. Progress and cancellation, after each denoising step.
    progress = {"steps": 0, "interrupted": False}

    def callback_on_step_end(p: DiffusionPipeline, i: int, t: Any, tensors: dict) -> dict:
        progress["steps"] = i + 1
        if on_step is not None and on_step(i + 1, p.num_timesteps):
            p._interrupt = True
            progress["interrupted"] = True
        return tensors

    # 6. Denoise and decode, with the job's scheduler in place for this call only.
    default_scheduler = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        out = pipe(**kwargs, callback_on_step_end=callback_on_step_end)
    finally:
        pipe.scheduler = default_scheduler

    # 7. The result, with the mask as the model saw it.
    images = list(out.images)
    width, height = images[0].size
    mask_used = None
    if kind == "inpaint":
        processed = pipe.mask_processor.preprocess(mask, height=height, width=width)
        mask_used = pipe.mask_processor.postprocess(processed, output_type="pil")[0].convert("L")
    return RenderResult(
        images=images,
        mask_used=mask_used,
        interrupted=progress["interrupted"],
        steps=progress["steps"],
        height=height,
        width=width,
        nsfw_content_detected=getattr(out, "nsfw_content_detected", None),
    )


def make_scheduler(name: str | None, default: Any) -> Any:
    """A fresh scheduler: `name` from `farm.jobs.SCHEDULERS`, configured from the model's default.

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
