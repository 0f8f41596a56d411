"""Refs a job names: models, IP-Adapters and LoRA adapters, checked for form only.

Where a ref points is resolved by the worker (`workers.models.pipelines`); what the submitting
machine can see of it is checked by `farm.inputs.models`. One rule tells a Hugging Face repo
id from a path (`is_repo_id`), used by both sides.
"""

from __future__ import annotations

import os
import re

BUILTIN_MODELS = {
    "tiny": "txt2img/img2img: a tiny Stable Diffusion (4-channel UNet), seeded random weights",
    "tiny-inpaint": "inpaint: a tiny Stable Diffusion inpainting model (9-channel UNet)",
    "tiny-sdxl": "txt2img/img2img: a tiny SDXL (two text encoders, size conditioning)",
    "tiny-sdxl-inpaint": "inpaint: a tiny SDXL inpainting model (9-channel UNet)",
    "tiny-sd3": "txt2img/img2img: a tiny SD3 (MMDiT transformer, three text encoders)",
    "tiny-flux": "txt2img/img2img: a tiny FLUX.1 (transformer, CLIP and T5 encoders)",
    "tiny-flux-fill": "inpaint: a tiny FLUX.1 Fill (masked image and mask as extra inputs)",
}
"""Built-in models, built offline with seeded random weights: one or two per family."""

BUILTIN_IP_ADAPTERS = {
    "tiny-ip-adapter": "IP-Adapter for `tiny`: a tiny CLIP image encoder and image projection, "
    "seeded random weights",
    "tiny-sdxl-ip-adapter": "IP-Adapter for `tiny-sdxl`: a tiny CLIP image encoder and image "
    "projection, seeded random weights",
}
"""Built-in IP-Adapters (`ip_adapter` of a style job); each the default for its built-in."""

DEFAULT_IP_ADAPTERS = {"tiny": "tiny-ip-adapter", "tiny-sdxl": "tiny-sdxl-ip-adapter"}
"""The built-in model → the built-in IP-Adapter a style job on it gets when it names none (an
adapter fits one base model's cross-attention, so other models must name theirs)."""

BUILTIN_SIZES = {
    "tiny": 8_511_760,
    "tiny-inpaint": 8_517_520,
    "tiny-sdxl": 3_039_684,
    "tiny-sdxl-inpaint": 3_040_044,
    "tiny-sd3": 2_077_492,
    "tiny-flux": 870_224,
    "tiny-flux-fill": 880_464,
    "tiny-ip-adapter": 188_968,
    "tiny-sdxl-ip-adapter": 132_392,
}
"""Bytes of each built-in's float32 weights once built (they have no files), for `farm models
list` without importing torch; tests/workers/builtin/ check them against the builders."""

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}(@[\w./-]{1,128})?$")
"""`org/name[@revision]`, as the Hugging Face Hub names repos."""

_PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")

_PATH_STARTS = ("/", "./", "../", "~")


def is_repo_id(ref: str) -> bool:
    """Whether `ref` names a Hugging Face repo (`org/name[@revision]`) rather than a built-in
    or a path: the one rule, at submit and on workers. (Where both could be meant, a local
    folder of that name wins: resolvers look on disk first.)"""
    return (
        ref not in BUILTIN_MODELS
        and ref not in BUILTIN_IP_ADAPTERS
        and not ref.startswith(_PATH_STARTS)
        and not ref.endswith(".safetensors")
        and ".." not in ref
        and REPO_ID.match(ref) is not None
    )


def check_model_ref(ref: str) -> str:
    """Check the form of a model ref; where it points is resolved by the worker.

    A ref is a built-in name, a Hugging Face repo id (`org/name[@revision]`, from the local
    cache), a local diffusers folder, or a single `.safetensors` checkpoint.
    """
    ref = ref.strip()
    if not ref:
        raise ValueError("must not be empty")
    if ref in BUILTIN_MODELS:
        return ref
    if ref.lower().endswith(_PICKLE_SUFFIXES):
        raise ValueError(f"{ref!r} is pickle weights; only .safetensors is loaded")
    if "://" in ref:
        raise ValueError(f"{ref!r}: model refs are a built-in name, org/name, or a local path")
    if ".." in ref.replace("\\", "/").split("/"):
        raise ValueError(f"{ref!r} escapes its folder ('..' is not allowed in model refs)")
    if is_repo_id(ref):
        return ref
    if ref.startswith(_PATH_STARTS) or ref.endswith(".safetensors") or os.sep in ref:
        return ref
    raise ValueError(
        f"{ref!r} is not a built-in model ({', '.join(BUILTIN_MODELS)}), a repo id (org/name) "
        "or a local path"
    )


def check_ip_adapter_ref(ref: str) -> str:
    """Check the form of an IP-Adapter ref: a built-in name, `org/name[@revision]` (local
    Hugging Face cache), a local folder, or its `.safetensors` weights file."""
    ref = ref.strip()
    if ref in BUILTIN_IP_ADAPTERS:
        return ref
    if ref in BUILTIN_MODELS:
        raise ValueError(
            f"{ref!r} is a model, not an IP-Adapter ({', '.join(BUILTIN_IP_ADAPTERS)})"
        )
    return check_model_ref(ref)


_JOB_REF = re.compile(r"^job:[A-Za-z0-9_-]{1,64}$")


def check_adapter_ref(ref: str) -> str:
    """Check the form of a LoRA adapter ref.

    `job:<id>` (the adapter a fine-tune job of this farm wrote, `adapters/<id>/...`), an
    `s3://` or `file://` URI of a `.safetensors` file, or a local `.safetensors` path.
    """
    ref = ref.strip()
    if not ref:
        raise ValueError("must not be empty")
    if ref.startswith("job:"):
        if not _JOB_REF.match(ref):
            raise ValueError(f"{ref!r} is not a job ref (job:<id>)")
        return ref
    if ref.lower().endswith(_PICKLE_SUFFIXES):
        raise ValueError(f"{ref!r} is pickle weights; only .safetensors is loaded")
    if "://" in ref and not ref.startswith(("s3://", "file://")):
        raise ValueError(f"{ref!r}: adapter refs are job:<id>, s3://, file:// or a local path")
    if ".." in ref.replace("\\", "/").split("/"):
        raise ValueError(f"{ref!r} escapes its folder ('..' is not allowed in adapter refs)")
    if not ref.endswith(".safetensors"):
        raise ValueError(f"{ref!r} is not a .safetensors file")
    return ref
