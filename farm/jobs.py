"""Job specs, job records, and the table of allowed state changes.

A spec is what the user asks for; its field names are diffusers' own argument names
(`prompt`, `num_inference_steps`, `guidance_scale`, `strength`, `height`, `width`,
`num_images_per_prompt`, `mask_image`), so whoever knows diffusers knows the farm:

    >>> Txt2Img(model="tiny", prompt="a red fox", seed=1, num_inference_steps=20)

A record is what the farm knows about a job: its state, attempt and outputs. Records live in
Redis (see `farm.tracker`); only `farm.tracker.Tracker.transition` changes a state, and only
along `TRANSITIONS`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from farm.errors import InvalidJob
from farm.masks import MaskGenerator, generator_from

# --------------------------------------------------------------------------- states


class JobState(StrEnum):
    WAITING = "waiting"
    """Held back until the jobs it depends on end (a render naming an unfinished fine-tune's
    adapter); then queued, or failed with the reason its dependency failed."""
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.WAITING: frozenset({JobState.QUEUED, JobState.CANCELLED, JobState.FAILED}),
    # queued → failed: refused by a worker before it ran (bad model ref, dead-lettered).
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    # running → queued: the attempt is handed back (retry, shutdown, lease expired).
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}
"""Which state may follow which. Terminal states have no successor."""


def allowed(src: JobState | str, dst: JobState | str) -> bool:
    return JobState(dst) in TRANSITIONS[JobState(src)]


# --------------------------------------------------------------------------- queues

RENDER_QUEUE = "render"
"""The queue of txt2img, img2img, inpaint and style jobs."""

FINETUNE_QUEUE = "finetune"
"""The queue of fine-tunes: its own, so renders never wait behind a training run."""


def queue_for(spec: Any) -> str:
    """The queue a job of this spec is sent to."""
    return FINETUNE_QUEUE if spec.kind == "finetune" else RENDER_QUEUE


@functools.lru_cache(maxsize=4096)
def model_queue(ref: str) -> str:
    """The affinity queue of renders for model `ref`: `render.<slug>`, consumed first by the
    workers that hold `ref` warm (see `farm.affinity`). A ref that is not already a plain
    slug gets a short hash, so two refs never share a queue."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", ref.lower()).strip("-.")[:64]
    if slug != ref:
        slug = f"{slug}-{hashlib.sha256(ref.encode()).hexdigest()[:8]}"
    return f"{RENDER_QUEUE}.{slug}"


# --------------------------------------------------------------------------- schedulers

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
"""Scheduler name → (diffusers class name, extra config). Built from the model's own config."""

# --------------------------------------------------------------------------- model refs

BUILTIN_MODELS = {
    "tiny": "txt2img/img2img: a tiny Stable Diffusion (4-channel UNet), seeded random weights",
    "tiny-inpaint": "inpaint: a tiny Stable Diffusion inpainting model (9-channel UNet)",
}

BUILTIN_IP_ADAPTERS = {
    "tiny-ip-adapter": "IP-Adapter for `tiny`: a tiny CLIP image encoder and image projection, "
    "seeded random weights",
}
"""Built-in IP-Adapters (`ip_adapter` of a style job); the default for the built-in `tiny`."""

BUILTIN_SIZES = {"tiny": 8_511_760, "tiny-inpaint": 8_517_520, "tiny-ip-adapter": 188_968}
"""Bytes of each built-in's float32 weights once built (they have no files), for `farm models
list` without importing torch; tests/workers/test_tiny.py checks them against the builders."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}(@[\w./-]{1,128})?$")
_PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")


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
    looks_like_path = ref.startswith(("/", "./", "~")) or ref.endswith(".safetensors")
    if not looks_like_path and _REPO_ID.match(ref):
        if ".." in ref:
            raise ValueError(f"{ref!r} is not a valid repo id")
        return ref
    if looks_like_path or os.sep in ref:
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


# --------------------------------------------------------------------------- specs


def _image_input(value: Any) -> Any:
    """An image given as a path, an `s3://`/`file://` URI, bytes, or a PIL image."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must not be empty")
        return value
    if isinstance(value, bytes | bytearray) or hasattr(value, "getpixel"):
        return value
    raise ValueError(f"expected a path, URI, bytes or PIL image, got {type(value).__name__}")


def _multiple_of_8(name: str, value: int | None) -> int | None:
    if value is not None and value % 8:
        raise ValueError(f"must be a multiple of 8, got {value}")
    return value


ImageInput = Annotated[Any, Field(description="path, s3:// URI, bytes or PIL image")]
Size = Annotated[int | None, Field(default=None, ge=8, le=4096)]


class LoraRef(BaseModel):
    """A LoRA adapter applied to a render at `scale` (diffusers' `set_adapters` weight)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str
    scale: float = Field(default=1.0, ge=-10.0, le=10.0, allow_inf_nan=False)

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str) -> str:
        return check_adapter_ref(v)


class _RenderSpec(BaseModel):
    """Fields every render job has, named and defaulted as diffusers does."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    model: str
    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int = Field(default=50, ge=1, le=500)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=100.0, allow_inf_nan=False)
    scheduler: str | None = None
    height: Size = None
    width: Size = None
    num_images_per_prompt: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    loras: list[LoraRef] = Field(default=[], max_length=8)
    """LoRA adapters for this render, loaded for the job and unloaded after it."""
    priority: int = Field(default=0, ge=0, le=9)
    key: str | None = Field(default=None, min_length=1, max_length=512)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_ref(v)

    @field_validator("loras", mode="before")
    @classmethod
    def _loras(cls, v: Any) -> Any:
        """A bare ref string is the adapter at scale 1."""
        if isinstance(v, list):
            return [{"ref": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str | None) -> str | None:
        if v is not None and v not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {v!r}; choose one of {', '.join(SCHEDULERS)}")
        return v

    @field_validator("height", "width")
    @classmethod
    def _size(cls, v: int | None, info: Any) -> int | None:
        return _multiple_of_8(info.field_name, v)


class Txt2Img(_RenderSpec):
    """Text to image (diffusers' `StableDiffusionPipeline`)."""

    kind: Literal["txt2img"] = "txt2img"

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty for txt2img")
        return v


class Img2Img(_RenderSpec):
    """Image to image (diffusers' `StableDiffusionImg2ImgPipeline`)."""

    kind: Literal["img2img"] = "img2img"
    image: ImageInput
    strength: float = Field(default=0.8, gt=0.0, le=1.0, allow_inf_nan=False)

    _image = field_validator("image")(classmethod(lambda cls, v: _image_input(v)))


class Inpaint(_RenderSpec):
    """Inpainting (diffusers' `StableDiffusionInpaintPipeline`): white mask pixels are repainted."""

    kind: Literal["inpaint"] = "inpaint"
    image: ImageInput
    mask_image: ImageInput
    """White pixels are repainted. An image (path, URI, bytes, PIL image), or a generated mask
    (`farm.masks`): `{"generator": "strokes", "seed": 7, ...}` or `Strokes(seed=7)`, drawn by
    the worker at the image's size; without a seed of its own it is drawn with the job's."""
    strength: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    padding_mask_crop: int | None = Field(default=None, ge=0, le=4096)
    """diffusers' own: inpaint only a crop around the mask (grown by this many pixels) at the
    working size, then paste it back over the source. Such jobs always run alone."""
    mask_blur: int = Field(default=0, ge=0, le=64)
    """Gaussian blur radius for the mask (`pipe.mask_processor.blur`), after `mask_dilate`."""
    mask_dilate: int = Field(default=0, ge=0, le=64)
    """Grow the white (repainted) region by this many pixels before blurring."""
    preserve_unmasked: bool = False
    """Composite the output over the source with the (dilated, blurred) mask at the source's
    size, so pixels outside the mask come back identical. Off: the pixels diffusers gives."""

    _image = field_validator("image")(classmethod(lambda cls, v: _image_input(v)))

    @field_validator("mask_image")
    @classmethod
    def _mask(cls, v: Any) -> Any:
        if isinstance(v, dict | MaskGenerator):
            return generator_from(v)
        return _image_input(v)

    def mask_generator(self) -> MaskGenerator | None:
        """The generated mask this job asks for, seeded (its own seed, else the job's), or None
        when `mask_image` is an image."""
        gen = self.mask_image
        if not isinstance(gen, MaskGenerator):
            return None
        if gen.seed is None and self.seed is not None:
            gen = gen.model_copy(update={"seed": self.seed})
        return gen


class Finetune(BaseModel):
    """A LoRA fine-tune of a model's UNet (optionally its text encoder too).

    Fields are named as diffusers' training scripts (`train_dreambooth_lora.py`,
    `train_text_to_image_lora.py`) name their flags. Training images are a local folder
    (uploaded at submit), an `s3://` prefix, or a list of images; each image's caption is
    its entry in `captions`, else a sidecar `<name>.txt`, else `instance_prompt`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: Literal["finetune"] = "finetune"
    model: str
    images: str | list[ImageInput]
    captions: list[str] | None = None
    instance_prompt: str | None = None
    rank: int = Field(default=4, ge=1, le=256)
    lora_alpha: float | None = Field(default=None, gt=0, le=4096, allow_inf_nan=False)
    """LoRA alpha; None: equal to `rank` (what diffusers' scripts do)."""
    train_text_encoder: bool = False
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0, allow_inf_nan=False)
    max_train_steps: int = Field(default=500, ge=1, le=1_000_000)
    resolution: int = Field(default=512, ge=8, le=2048)
    train_batch_size: int = Field(default=1, ge=1, le=64)
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    checkpointing_steps: int = Field(default=500, ge=1, le=1_000_000)
    checkpoints_total_limit: int | None = Field(default=None, ge=1, le=10_000)
    """Keep only the newest this many checkpoints in storage; None: keep them all."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """On a GPU worker; a CPU worker trains in float32 whatever this says."""
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    priority: int = Field(default=0, ge=0, le=9)
    key: str | None = Field(default=None, min_length=1, max_length=512)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v.strip() == "tiny-inpaint":
            raise ValueError(
                "'tiny-inpaint' is an inpainting model; fine-tunes train txt2img models"
            )
        return check_model_ref(v)

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v: int, info: Any) -> int:
        return _multiple_of_8(info.field_name, v)  # type: ignore[return-value]

    @field_validator("images")
    @classmethod
    def _images(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("must name at least one training image")
            return [_image_input(x) for x in v]
        return _image_input(v)


class Style(Img2Img):
    """Style transfer: img2img of `image` (the content) with the UNet also conditioned on
    `ip_adapter_image` (the style reference) through an IP-Adapter (diffusers'
    `load_ip_adapter`, `set_ip_adapter_scale`, `ip_adapter_image`).

    `ip_adapter_scale` 0.6 by default: with a text prompt as well, the IP-Adapter authors
    advise about 0.5 and diffusers' docs use 0.6; 1.0 lets the reference image dominate the
    prompt. 0 is exactly plain img2img. `ip_adapter` defaults to the built-in `tiny-ip-adapter`
    for the built-in `tiny`; any other model needs one made for it (its cross-attention size).
    """

    kind: Literal["style"] = "style"  # type: ignore[assignment]
    ip_adapter_image: ImageInput
    ip_adapter_scale: float = Field(default=0.6, ge=0.0, le=10.0, allow_inf_nan=False)
    ip_adapter: str | None = Field(default=None, validate_default=True)
    ip_adapter_weight_name: str | None = Field(default=None, min_length=1, max_length=512)
    """diffusers' `weight_name`: the weights file inside an `ip_adapter` folder or repo (e.g.
    `models/ip-adapter_sd15.safetensors`); None: the folder's only top-level `.safetensors`."""

    _style_image = field_validator("ip_adapter_image")(classmethod(lambda cls, v: _image_input(v)))

    @field_validator("ip_adapter")
    @classmethod
    def _ip_adapter(cls, v: str | None, info: Any) -> str:
        if v is not None:
            return check_ip_adapter_ref(v)
        model = info.data.get("model")
        if model == "tiny":
            return "tiny-ip-adapter"
        raise ValueError(
            f"is required for model {model!r} (the built-in tiny-ip-adapter fits the built-in "
            "tiny only)"
        )

    @field_validator("ip_adapter_weight_name")
    @classmethod
    def _weight_name(cls, v: str | None) -> str | None:
        if v is not None and (
            not v.endswith(".safetensors") or v.startswith("/") or ".." in v.split("/")
        ):
            raise ValueError(f"must be a .safetensors file inside the adapter's folder, got {v!r}")
        return v


RenderSpec = Annotated[Txt2Img | Img2Img | Inpaint | Style, Field(discriminator="kind")]
JobSpec = Annotated[Txt2Img | Img2Img | Inpaint | Style | Finetune, Field(discriminator="kind")]
"""Every job kind the farm runs."""

RENDER_KINDS = ("txt2img", "img2img", "inpaint", "style")

FLAG_FIELDS = {
    "steps": "num_inference_steps",
    "num_images": "num_images_per_prompt",
    "style_image": "ip_adapter_image",
    "style_scale": "ip_adapter_scale",
}
"""Command-line flags whose spec field has diffusers' longer name; other flags are the field."""


def flag_field(flag: str) -> str:
    return FLAG_FIELDS.get(flag, flag)


SPECS: dict[str, type[BaseModel]] = {
    "txt2img": Txt2Img,
    "img2img": Img2Img,
    "inpaint": Inpaint,
    "style": Style,
    "finetune": Finetune,
}
_SPEC_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)


def describe_validation_error(err: ValidationError) -> tuple[str, str]:
    """(field, one line) for the first error: names the field and the value it got."""
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"] if not isinstance(p, int)]
    if loc and loc[0] in SPECS:  # the union's tag, not a field
        loc = loc[1:]
    field = ".".join(loc) or "kind"
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, dict) or repr(value) in msg else f" (got {value!r:.80})"
    if first["type"] == "missing":
        return field, f"{field}: is required"
    return field, f"{field}: {msg}{shown}"


def parse_spec(data: Any) -> Txt2Img | Img2Img | Inpaint | Style | Finetune:
    """A spec from a dict (or a spec), or `InvalidJob` naming the field and the value."""
    if isinstance(data, BaseModel):
        data = data.model_dump(exclude_unset=False)
    try:
        return _SPEC_ADAPTER.validate_python(data)
    except ValidationError as e:
        field, line = describe_validation_error(e)
        raise InvalidJob(line, field=field) from None


# --------------------------------------------------------------------------- batching

SIZE_MULTIPLE = 8
"""Working sizes are multiples of this (diffusers rounds an input image's size down to it)."""


def working_size(
    spec: Txt2Img | Img2Img | Inpaint, image_size: tuple[int, int] | None = None
) -> tuple[int | None, int | None]:
    """(height, width) the pipeline renders at: the spec's own, else the input image's size
    (`(width, height)`, as PIL gives it) rounded down to a multiple of 8. None: the model's
    default (txt2img without a size)."""
    height, width = spec.height, spec.width
    if spec.kind == "txt2img" or image_size is None:
        return height, width
    image_w, image_h = image_size
    height = height or image_h // SIZE_MULTIPLE * SIZE_MULTIPLE
    width = width or image_w // SIZE_MULTIPLE * SIZE_MULTIPLE
    if not (height and width):
        raise InvalidJob(
            f"image: {image_w}x{image_h} is too small to render without a height and width; "
            f"each side needs at least {SIZE_MULTIPLE} pixels",
            field="image",
        )
    return height, width


def batch_signature(
    spec: Txt2Img | Img2Img | Inpaint, image_size: tuple[int, int] | None = None
) -> str | None:
    """A hash of what must be equal for jobs to share one pipeline call, or None: runs alone.

    Model, kind, working size, steps, scheduler, guidance, strength, images per prompt, the
    mask options and the LoRA adapters; for style jobs, the IP-Adapter, its reference image
    (URI) and scale. Fine-tunes always run alone. Prompts, seeds, images and masks differ
    freely: each image has its own generator. `padding_mask_crop` jobs run alone: diffusers crops one image per call.
    """
    if spec.kind not in RENDER_KINDS or getattr(spec, "padding_mask_crop", None) is not None:
        return None
    height, width = working_size(spec, image_size)
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
    }
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


# --------------------------------------------------------------------------- records


class Progress(BaseModel):
    step: int = 0
    total: int = 0
    loss: float | None = None
    """A fine-tune's latest training loss."""


class JobRecord(BaseModel):
    """What the farm knows of one job; mirrors the Redis hash `farm:job:<id>`."""

    id: str
    kind: str
    state: JobState
    spec: dict[str, Any]
    attempt: int = 0
    worker: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress = Progress()
    cancel_requested: bool = False
    error: str | None = None
    outputs: list[str] = []
    mask: str | None = None
    meta: str | None = None
    signature: str | None = None
    """Batch signature (`batch_signature`): jobs that share one may run as one pipeline call."""
    queue: str | None = None
    """The queue its message goes to (`queue_for`); re-sends go there too."""
    depends_on: list[str] = []
    """Jobs that must succeed before this one is queued (a `waiting` job)."""

    @property
    def done(self) -> bool:
        return self.state.terminal
