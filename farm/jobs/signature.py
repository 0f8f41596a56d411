"""Batch signatures: what must be equal for jobs to share one pipeline call.

The worker that claims a job gathers queued jobs with its signature (`farm.state.tracker`
indexes them) and renders them as one call; each image keeps its own generator, so its pixels
are the ones it gets alone.
"""

from __future__ import annotations

import hashlib
import json

from farm.errors import InvalidJob
from farm.jobs.families import BUILTIN_INFO, FAMILY_ARGS, PER_IMAGE_ARGS, ModelInfo
from farm.jobs.specs import RENDER_KINDS, Img2Img, Inpaint, Txt2Img, left_out

SIZE_MULTIPLE = 8
"""Working sizes are multiples of this (diffusers rounds an input image's size down to it), or
of the model's own `ModelInfo.size_multiple` where it is known (16 for SD3 and FLUX.1)."""


def working_size(
    spec: Txt2Img | Img2Img | Inpaint,
    image_size: tuple[int, int] | None = None,
    multiple: int = SIZE_MULTIPLE,
) -> tuple[int | None, int | None]:
    """(height, width) the pipeline renders at: the spec's own, else the input image's size
    (`(width, height)`, as PIL gives it) rounded down to a multiple of `multiple`. None: the
    model's default (txt2img without a size, where the model is not known)."""
    height, width = spec.height, spec.width
    if spec.kind == "txt2img" or image_size is None:
        return height, width
    image_w, image_h = image_size
    height = height or image_h // multiple * multiple
    width = width or image_w // multiple * multiple
    if not (height and width):
        raise InvalidJob(
            f"image: {image_w}x{image_h} is too small to render without a height and width; "
            f"each side needs at least {multiple} pixels",
            field="image",
        )
    return height, width


def batch_signature(
    spec: Txt2Img | Img2Img | Inpaint,
    image_size: tuple[int, int] | None = None,
    info: ModelInfo | None = None,
) -> str | None:
    """A hash of what must be equal for jobs to share one pipeline call, or None: runs alone.

    Model, kind, working size, steps, scheduler, guidance, strength, images per prompt, the
    mask options and the LoRA adapters; the family arguments the call shares (SDXL's sizes and
    aesthetic scores, `true_cfg_scale`, `max_sequence_length`, `denoising_*`, a refiner), and,
    where the family renders "no negative prompt" unlike `""` (SDXL, FLUX.1; any model whose
    family `info` does not tell), whether a negative prompt is given; fields still left to the
    model's defaults; for style jobs, the IP-Adapter, its reference image (URI) and scale.
    Fine-tunes always run alone. Prompts (`prompt_2`, `prompt_3` too), seeds, images and masks
    differ freely: each image has its own generator. `padding_mask_crop` jobs run alone:
    diffusers crops one image per call.
    """
    if spec.kind not in RENDER_KINDS or getattr(spec, "padding_mask_crop", None) is not None:
        return None
    info = info or BUILTIN_INFO.get(spec.model)
    multiple = info.size_multiple if info is not None else SIZE_MULTIPLE
    height, width = working_size(spec, image_size, multiple)
    fields = {
        "model": spec.model,
        "kind": spec.kind,
        "height": height,
        "width": width,
        "num_inference_steps": spec.num_inference_steps,
        "scheduler": spec.scheduler,
        "guidance_scale": spec.guidance_scale,
        "strength": getattr(spec, "strength", None),
        "num_images_per_prompt": spec.num_images_per_prompt,
        "mask_blur": getattr(spec, "mask_blur", None),
        "mask_dilate": getattr(spec, "mask_dilate", None),
        "preserve_unmasked": getattr(spec, "preserve_unmasked", None),
        "loras": [[lora.ref, lora.scale] for lora in spec.loras],
        "left_out": sorted(left_out(spec)),
        "refiner": spec.refiner.model_dump(mode="json") if spec.refiner else None,
    }
    fields.update({k: getattr(spec, k) for k in FAMILY_ARGS if k not in PER_IMAGE_ARGS})
    if info is None or info.traits.negative_matters:
        fields["negative"] = spec.negative_prompt is not None
    if spec.kind == "style":  # one reference image, adapter and scale per call
        if not isinstance(spec.ip_adapter_image, str):
            return None  # not stored yet: nothing to tell two such images apart by
        fields.update(
            ip_adapter=spec.ip_adapter,
            ip_adapter_weight_name=spec.ip_adapter_weight_name,
            ip_adapter_image=spec.ip_adapter_image,
            ip_adapter_scale=spec.ip_adapter_scale,
        )
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
