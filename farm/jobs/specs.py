"""Job specs: what the user asks for, validated at the edge.

A spec's field names are diffusers' own argument names (`prompt`, `num_inference_steps`,
`guidance_scale`, `strength`, `height`, `width`, `num_images_per_prompt`, `mask_image`), so
whoever knows diffusers knows the farm:

    >>> Txt2Img(model="tiny", prompt="a red fox", seed=1, num_inference_steps=20)

`parse_spec` turns a dict (or a spec) into the right kind, or an `InvalidJob` naming the field
and the value.
"""

from __future__ import annotations

import difflib
import os
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from farm.errors import InvalidJob
from farm.jobs.families import BUILTIN_INFO, KARRAS_SCHEDULERS, SCHEDULER_NAMES
from farm.jobs.masks import MaskGenerator, generator_from
from farm.jobs.refs import (
    DEFAULT_IP_ADAPTERS,
    check_adapter_ref,
    check_ip_adapter_ref,
    check_model_ref,
)

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    name: (choice.class_name, dict(choice.config)) for name, choice in KARRAS_SCHEDULERS.items()
}
"""Stable Diffusion's (and SDXL's) schedulers: name → (diffusers class name, extra config), built
from the model's own config. Each family has its own table (`farm.jobs.families`): on SD3 and
FLUX.1 the same names mean their flow-matching counterparts."""

DEFAULTED = ("num_inference_steps", "guidance_scale", "strength")
"""Fields that take the model's own pipeline default when left out (`left_out`). Until the job is
resolved against its model (`farm.jobs.defaults.resolve`) they read as Stable Diffusion 1.5's."""


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


def check_webhook(value: str | None) -> str | None:
    """A webhook URL's form: http or https, a host, no credentials. Where it points (public
    addresses only, unless allowed) is checked at submit and again before each delivery."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {value!r}")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (the farm signs its deliveries instead)")
    return value


ImageInput = Annotated[Any, Field(description="path, s3:// URI, bytes or PIL image")]
Size = Annotated[int | None, Field(default=None, ge=8, le=4096)]
Pair = tuple[Annotated[int, Field(ge=0, le=16384)], Annotated[int, Field(ge=0, le=16384)]]
Fraction = Annotated[float | None, Field(default=None, gt=0.0, lt=1.0, allow_inf_nan=False)]
Score = Annotated[float | None, Field(default=None, ge=0.0, le=10.0, allow_inf_nan=False)]
Prompt = Annotated[str | None, Field(default=None, max_length=10_000)]


def known_scheduler(value: str) -> str:
    """A scheduler name some family knows: a farm name or a diffusers class name, any case
    (`DDIM`, `dpmpp-2m`, `EulerAncestralDiscreteScheduler`), lower-cased; `ValueError` with the
    closest name otherwise. Which ones fit a model is checked against its family at resolve
    (`farm.jobs.defaults.scheduler_name`)."""
    name = value.strip().lower().replace("-", "_")
    classes = {c.class_name.lower() for c in KARRAS_SCHEDULERS.values()}
    classes |= {"flowmatcheulerdiscretescheduler", "flowmatchheundiscretescheduler"}
    if name in SCHEDULER_NAMES or name in classes:
        return name
    close = difflib.get_close_matches(name, list(SCHEDULER_NAMES), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown scheduler {value!r}{hint} (choose one of {', '.join(SCHEDULER_NAMES)}, or a "
        "diffusers scheduler class name)"
    )


class LoraRef(BaseModel):
    """A LoRA adapter applied to a render at `scale` (diffusers' `set_adapters` weight)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str
    scale: float = Field(default=1.0, ge=-10.0, le=10.0, allow_inf_nan=False)

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str) -> str:
        return check_adapter_ref(v)


class Refiner(BaseModel):
    """The second stage of an SDXL base → refiner render (diffusers' "ensemble of expert
    denoisers"): the base denoises until the job's `denoising_end` and hands its latents to
    this model's img2img (or inpaint) pipeline, which denoises from `denoising_start`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    denoising_start: Fraction = None
    """None: the job's `denoising_end`, as diffusers' docs pair them."""
    guidance_scale: float | None = Field(default=None, ge=0.0, le=100.0, allow_inf_nan=False)
    """None: the refiner pipeline's own default."""
    aesthetic_score: Score = None
    negative_aesthetic_score: Score = None

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_ref(v)


class _RenderSpec(BaseModel):
    """Fields every render job has, named and defaulted as diffusers does.

    A field left out takes the model's own pipeline default (`DEFAULTED`, `height`/`width`,
    the family arguments): the spec remembers which were left out (`left_out`), and
    `farm.jobs.defaults.resolve` fills them in once the model's family is known.
    """

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
    preview_every: int | None = Field(default=None, ge=1, le=1000)
    """Publish a small preview every this many steps (latents mapped to RGB by a fixed linear
    approximation): SSE `preview` events and the dashboard show it. Off (None) by default; the
    pixels are the same either way."""
    webhook: str | None = Field(default=None, max_length=2048)
    """POSTed the job's record when it ends, signed (`X-Farm-Signature`), at least once."""
    # Family arguments (`farm.jobs.families.FAMILY_ARGS`), diffusers' names; refused on a
    # pipeline that does not take them.
    prompt_2: Prompt = None
    """SDXL, SD3, FLUX.1: the prompt for the second text encoder (None: `prompt`)."""
    negative_prompt_2: Prompt = None
    prompt_3: Prompt = None
    """SD3: the prompt for the T5 encoder (None: `prompt`)."""
    negative_prompt_3: Prompt = None
    original_size: Pair | None = None
    """SDXL micro-conditioning, (height, width); None: the working size."""
    target_size: Pair | None = None
    crops_coords_top_left: Pair | None = None
    aesthetic_score: Score = None
    """SDXL img2img and inpaint (refiner-style models)."""
    negative_aesthetic_score: Score = None
    true_cfg_scale: float | None = Field(default=None, ge=0.0, le=100.0, allow_inf_nan=False)
    """FLUX.1: real classifier-free guidance with `negative_prompt` when above 1."""
    max_sequence_length: int | None = Field(default=None, ge=1, le=512)
    """SD3, FLUX.1: T5 tokens the prompt is cut to."""
    denoising_start: Fraction = None
    """SDXL img2img and inpaint: start denoising this far in (skips `strength`)."""
    denoising_end: Fraction = None
    """SDXL: stop this far in; with `refiner`, the refiner takes over from there."""
    refiner: Refiner | None = None
    """SDXL: a refiner model ref (or `Refiner`) for a two-stage render in one job."""

    @field_validator("refiner", mode="before")
    @classmethod
    def _refiner(cls, v: Any) -> Any:
        """A bare model ref is that refiner with its defaults."""
        return {"model": v} if isinstance(v, str) else v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_ref(v)

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        return check_webhook(v)

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
        return None if v is None else known_scheduler(v)

    @field_validator("height", "width")
    @classmethod
    def _size(cls, v: int | None, info: Any) -> int | None:
        return _multiple_of_8(info.field_name, v)


class Txt2Img(_RenderSpec):
    """Text to image (diffusers' `StableDiffusionPipeline`, or its family's)."""

    kind: Literal["txt2img"] = "txt2img"

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty for txt2img")
        return v


class Img2Img(_RenderSpec):
    """Image to image (diffusers' `StableDiffusionImg2ImgPipeline`, or its family's)."""

    kind: Literal["img2img"] = "img2img"
    image: ImageInput
    strength: float = Field(default=0.8, gt=0.0, le=1.0, allow_inf_nan=False)

    _image = field_validator("image")(classmethod(lambda cls, v: _image_input(v)))


class Inpaint(_RenderSpec):
    """Inpainting (diffusers' `StableDiffusionInpaintPipeline`, or its family's; FLUX.1 Fill's
    own): white mask pixels are repainted."""

    kind: Literal["inpaint"] = "inpaint"
    image: ImageInput
    mask_image: ImageInput
    """White pixels are repainted. An image (path, URI, bytes, PIL image), or a generated mask
    (`farm.jobs.masks`): `{"generator": "strokes", "seed": 7, ...}` or `Strokes(seed=7)`, drawn by
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
    webhook: str | None = Field(default=None, max_length=2048)
    """POSTed the job's record when it ends, signed (`X-Farm-Signature`), at least once."""

    _webhook = field_validator("webhook")(classmethod(lambda cls, v: check_webhook(v)))

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
    for the built-in `tiny` and `tiny-sdxl-ip-adapter` for `tiny-sdxl`
    (`farm.jobs.refs.DEFAULT_IP_ADAPTERS`); any other model needs one made for it (its
    cross-attention size). Families without IP-Adapters (SD3, FLUX.1) are refused at submit.
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
    def _ip_adapter(cls, v: str | None, info: Any) -> str | None:
        if v is not None:
            return check_ip_adapter_ref(v)
        model = info.data.get("model")
        if model in DEFAULT_IP_ADAPTERS:
            return DEFAULT_IP_ADAPTERS[model]
        if model in BUILTIN_INFO and not BUILTIN_INFO[model].traits.ip_adapter:
            return None  # the submit refuses the model itself: its family runs no style jobs
        raise ValueError(
            f"is required for model {model!r} (the built-in IP-Adapters fit the built-ins "
            f"{' and '.join(DEFAULT_IP_ADAPTERS)} only)"
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

SHORT_NAMES = {
    "steps": "num_inference_steps",
    "num_images": "num_images_per_prompt",
    "style_image": "ip_adapter_image",
    "style_scale": "ip_adapter_scale",
}
"""Short names for the fields whose diffusers name is long: CLI flags (`--steps`) and
manifest columns (`steps`) accept both."""


SPECS: dict[str, type[BaseModel]] = {
    "txt2img": Txt2Img,
    "img2img": Img2Img,
    "inpaint": Inpaint,
    "style": Style,
    "finetune": Finetune,
}
_SPEC_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)
_SPEC_TYPES = frozenset(SPECS.values())


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
    if first["type"] == "extra_forbidden":  # a field of another kind: say which kinds have it
        kind = next((str(p) for p in first["loc"] if str(p) in SPECS), None)
        have = [k for k, cls in SPECS.items() if field in cls.model_fields]
        where = f" (it is for {', '.join(have)})" if have else ""
        return field, f"{field}: not a field of {kind or 'these'} jobs{where}{shown}"
    return field, f"{field}: {msg}{shown}"


def left_out(spec: BaseModel) -> set[str]:
    """The `DEFAULTED` fields the user left out: they take the model's own defaults."""
    fields = type(spec).model_fields
    return {f for f in DEFAULTED if f in fields and f not in spec.model_fields_set}


def dump_spec(spec: BaseModel) -> dict[str, Any]:
    """The spec as its record holds it (JSON): fields left out stay out, so whoever reads it
    back still knows they take the model's defaults."""
    return spec.model_dump(mode="json", exclude_none=True, exclude=left_out(spec))


def parse_spec(data: Any) -> Txt2Img | Img2Img | Inpaint | Style | Finetune:
    """A spec from a dict (or a spec), or `InvalidJob` naming the field and the value.

    A spec object is taken as it is, as pydantic takes a model instance for a model field
    (`revalidate_instances='never'`): it was validated when made and on every assignment
    (`validate_assignment`), and submitting it never changes it (`Submission.prepare` works on
    copies). Another model is read as the fields it holds."""
    if type(data) in _SPEC_TYPES:
        return data
    if isinstance(data, BaseModel):
        data = data.model_dump(exclude_unset=False, exclude=left_out(data))
    try:
        return _SPEC_ADAPTER.validate_python(data)
    except ValidationError as e:
        field, line = describe_validation_error(e)
        raise InvalidJob(line, field=field) from None
