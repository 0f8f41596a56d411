"""Model families: which diffusers pipelines belong to each, what they take, default to and run.

The light side never imports diffusers, yet it must know, before anything is stored, what a job
on a model will do: the pipeline class each kind of job runs (what diffusers' AutoPipelines
pick), that pipeline's own defaults (`num_inference_steps`, `guidance_scale`, `strength`), the
arguments only some pipelines take (SDXL's `prompt_2` and micro-conditioning sizes, SD3's
`prompt_3`, FLUX.1's `true_cfg_scale`…), whether img2img takes a size, the schedulers that run
with it, and what a family can do beyond rendering. This table says it, written from diffusers
0.42.1's own signatures (`python -m workers.builtin.defaults` prints them), and
`tests/workers/models/test_families.py` checks it against the installed diffusers (its
signatures, AutoPipeline mappings and schedulers), so it cannot drift.

    >>> family = FAMILIES["sdxl"]
    >>> family.pipeline_for("img2img").defaults
    {'num_inference_steps': 50, 'guidance_scale': 5.0, 'strength': 0.3}
    >>> BUILTIN_INFO["tiny-flux-fill"].kinds
    ('inpaint',)

What a model is (`ModelInfo`) comes from its `model_index.json` and configs: for built-ins from
`BUILTIN_INFO`, for models the client can see from `farm.inputs.models.model_info`, and on a
worker from the loaded pipeline (`workers.models.families.info_of`): one set of rules on both
sides.

Capability flags, per family: `trainable` (a LoRA fine-tune, `workers.train`: every family, as
diffusers' DreamBooth LoRA script for it trains) and `ip_adapter` (style jobs,
`workers.render.ip_adapter`: SD 1.x/2.x and SDXL, whose UNets diffusers' `load_ip_adapter`
conditions; SD3 and FLUX.1 style is refused at submit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from farm.errors import InvalidJob

RENDER_KINDS = ("txt2img", "img2img", "inpaint")
"""The pipeline kinds. A style job runs its model's img2img pipeline with an IP-Adapter."""

COMMON_DEFAULTS = ("num_inference_steps", "guidance_scale", "strength")
"""Spec fields that every pipeline takes (strength: img2img and inpaint) and defaults itself."""

OPTIONAL_ARGS = (
    "negative_prompt",
    "padding_mask_crop",
    "prompt_2",
    "negative_prompt_2",
    "prompt_3",
    "negative_prompt_3",
    "original_size",
    "target_size",
    "crops_coords_top_left",
    "aesthetic_score",
    "negative_aesthetic_score",
    "true_cfg_scale",
    "max_sequence_length",
    "denoising_start",
    "denoising_end",
)
"""Spec fields some pipelines take and others do not (diffusers' names): a job that sets one is
refused on a pipeline without it."""

FAMILY_ARGS = OPTIONAL_ARGS[2:]
"""The family-only arguments among them (SDXL, SD3, FLUX.1); every render spec has them."""

PER_IMAGE_ARGS = ("prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3")
"""Family arguments passed per image in a micro-batch (like `prompt`); the others are shared
by the call, so they are part of the batch signature."""


@dataclass(frozen=True)
class Scheduler:
    """A scheduler by the farm's name: diffusers' class, built from the model's own config."""

    name: str
    class_name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    """Config over the model's own (`from_config(model_config, **config)`)."""
    flow: bool = False
    """A multistep solver configured for flow matching as diffusers' docs configure it:
    `use_flow_sigmas=True`, `prediction_type="flow_prediction"`, `flow_shift` = the model's
    `shift` (with dynamic shifting, FLUX.1's pipelines pass `mu` and the solver takes exp(mu))."""


@dataclass(frozen=True)
class Pipeline:
    """One diffusers pipeline class: the kind it runs, its `__call__`'s defaults and arguments."""

    class_name: str
    kind: str
    defaults: Mapping[str, Any]
    """`__call__`'s own defaults of `COMMON_DEFAULTS` (strength only where it takes one)."""
    args: Mapping[str, Any]
    """Each of `OPTIONAL_ARGS` it takes → its default there."""
    takes_size: bool
    """Whether `__call__` takes `height` and `width` (SD and SDXL img2img do not: they render
    at the input's size, so the farm resizes the input to the working size first)."""
    schedulers: tuple[str, ...]
    """The farm's scheduler names that run with it (see `Family.schedulers`)."""


@dataclass(frozen=True)
class Family:
    """A model family: its pipelines, schedulers and capabilities."""

    name: str
    title: str
    denoiser: str
    """The denoising component's name in the pipeline: `unet` or `transformer`."""
    pipelines: Mapping[str, Pipeline]
    """Every pipeline class of the family, by class name."""
    auto: Mapping[str, str]
    """Kind → the class diffusers' AutoPipeline picks for it (a dedicated model's own class,
    such as `FluxFillPipeline`, runs its kind instead)."""
    schedulers: Mapping[str, Scheduler]
    patch_size: int
    """Latent pixels per denoiser token: sizes are multiples of VAE scale × this."""
    fixed_sample_size: int | None
    """A `default_sample_size` the pipeline fixes in `__init__` rather than reading it from
    the denoiser's config (FLUX.1: 128)."""
    negative_matters: bool
    """Whether a job without a negative prompt renders differently from one with `""` (SDXL's
    `force_zeros_for_empty_prompt`; FLUX.1's true CFG runs only with a negative prompt): then
    having one or not is part of the batch signature."""
    trainable: bool
    """A LoRA fine-tune of its models works (`workers.train`)."""
    ip_adapter: bool
    """Style jobs (IP-Adapter) work on its models (`workers.render.ip_adapter`)."""

    def pipeline_for(self, kind: str, own: str | None = None) -> Pipeline:
        """The pipeline that runs `kind` ("style" runs img2img) for a model whose own class is
        `own`: that class where it runs this kind itself, else the AutoPipeline's choice."""
        kind = "img2img" if kind == "style" else kind
        if own is not None and own in self.pipelines and self.pipelines[own].kind == kind:
            return self.pipelines[own]
        return self.pipelines[self.auto[kind]]

    def scheduler(self, name: str) -> Scheduler | None:
        """The scheduler `name` means here (a farm name or a diffusers class name, any case)."""
        name = name.strip().lower()
        if name in self.schedulers:
            return self.schedulers[name]
        plain = [s for s in self.schedulers.values() if s.class_name.lower() == name]
        return plain[0] if plain else None


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


# --------------------------------------------------------------------------- schedulers

_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

KARRAS_SCHEDULERS = {
    s.name: s
    for s in [
        Scheduler("ddim", "DDIMScheduler"),
        Scheduler("ddpm", "DDPMScheduler"),
        Scheduler("pndm", "PNDMScheduler"),
        Scheduler("lms", "LMSDiscreteScheduler"),
        Scheduler("euler", "EulerDiscreteScheduler"),
        Scheduler("euler_a", "EulerAncestralDiscreteScheduler"),
        Scheduler("heun", "HeunDiscreteScheduler"),
        Scheduler("dpmpp_2m", "DPMSolverMultistepScheduler"),
        Scheduler("dpmpp_2m_karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        Scheduler(
            "dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}
        ),
        Scheduler("dpmpp_2s", "DPMSolverSinglestepScheduler"),
        Scheduler("kdpm2", "KDPM2DiscreteScheduler"),
        Scheduler("kdpm2_a", "KDPM2AncestralDiscreteScheduler"),
        Scheduler("deis", "DEISMultistepScheduler"),
        Scheduler("unipc", "UniPCMultistepScheduler"),
    ]
}
"""SD 1.x/2.x and SDXL: every class in their schedulers' `compatibles` that runs without an
extra package (DPMSolverSDEScheduler needs torchsde; EDMEulerScheduler is for EDM-trained
models), by the names samplers go by."""

FLOW_SCHEDULERS = {
    s.name: s
    for s in [
        Scheduler("euler", "FlowMatchEulerDiscreteScheduler"),
        Scheduler("heun", "FlowMatchHeunDiscreteScheduler"),
        Scheduler("dpmpp_2m", "DPMSolverMultistepScheduler", _FLOW, flow=True),
        Scheduler("dpmpp_2s", "DPMSolverSinglestepScheduler", _FLOW, flow=True),
        Scheduler("deis", "DEISMultistepScheduler", _FLOW, flow=True),
        Scheduler("unipc", "UniPCMultistepScheduler", _FLOW, flow=True),
    ]
}
"""SD3 and FLUX.1 (flow matching): the flow-matching Euler and Heun schedulers, and the
multistep solvers that support flow sigmas. Which of them a pipeline runs is its own
`schedulers` (img2img and inpaint need `scale_noise`, which only the flow-matching ones have;
FLUX.1's pipelines pass custom sigmas, which FlowMatchHeun does not take). Stochastic solvers
are left out: SD3 and FLUX.1 pipelines call `scheduler.step` without the generator."""

SCHEDULER_NAMES = tuple(dict.fromkeys([*KARRAS_SCHEDULERS, *FLOW_SCHEDULERS]))
"""Every scheduler name the farm knows, whatever the family."""

_KARRAS_ALL = tuple(KARRAS_SCHEDULERS)


# --------------------------------------------------------------------------- pipelines


_NEG = {"negative_prompt": None}
_CROP = {"padding_mask_crop": None}
_SDXL = {
    **_NEG,
    "prompt_2": None,
    "negative_prompt_2": None,
    "original_size": None,
    "target_size": None,
    "crops_coords_top_left": (0, 0),
    "denoising_end": None,
}
_SDXL_I2I = {
    **_SDXL,
    "aesthetic_score": 6.0,
    "negative_aesthetic_score": 2.5,
    "denoising_start": None,
}
_SD3 = {
    **_NEG,
    "prompt_2": None,
    "negative_prompt_2": None,
    "prompt_3": None,
    "negative_prompt_3": None,
    "max_sequence_length": 256,
}
_FLUX = {
    **_NEG,
    "prompt_2": None,
    "negative_prompt_2": None,
    "true_cfg_scale": 1.0,
    "max_sequence_length": 512,
}
_FILL = {"prompt_2": None, "max_sequence_length": 512}

_SD3_T2I = ("euler", "heun", "dpmpp_2m", "dpmpp_2s", "deis", "unipc")
_FLUX_T2I = ("euler", "dpmpp_2m", "dpmpp_2s", "deis", "unipc")

_PIPELINES: dict[str, list[tuple[Any, ...]]] = {
    # family: (class, kind, steps, guidance, strength, takes size, arguments, schedulers), the
    # first of each kind being the AutoPipeline's
    "sd": [
        ("StableDiffusionPipeline", "txt2img", 50, 7.5, None, True, _NEG, _KARRAS_ALL),
        ("StableDiffusionImg2ImgPipeline", "img2img", 50, 7.5, 0.8, False, _NEG, _KARRAS_ALL),
        ("StableDiffusionInpaintPipeline", "inpaint", 50, 7.5, 1.0, True, _NEG | _CROP, _KARRAS_ALL),
    ],
    "sdxl": [
        ("StableDiffusionXLPipeline", "txt2img", 50, 5.0, None, True, _SDXL, _KARRAS_ALL),
        ("StableDiffusionXLImg2ImgPipeline", "img2img", 50, 5.0, 0.3, False, _SDXL_I2I, _KARRAS_ALL),
        ("StableDiffusionXLInpaintPipeline", "inpaint", 50, 7.5, 0.9999, True, _SDXL_I2I | _CROP, _KARRAS_ALL),
    ],
    "sd3": [
        ("StableDiffusion3Pipeline", "txt2img", 28, 7.0, None, True, _SD3, _SD3_T2I),
        ("StableDiffusion3Img2ImgPipeline", "img2img", 50, 7.0, 0.6, True, _SD3, ("euler", "heun")),
        ("StableDiffusion3InpaintPipeline", "inpaint", 50, 7.0, 0.6, True, _SD3 | _CROP, ("euler", "heun")),
    ],
    "flux": [
        ("FluxPipeline", "txt2img", 28, 3.5, None, True, _FLUX, _FLUX_T2I),
        ("FluxImg2ImgPipeline", "img2img", 28, 7.0, 0.6, True, _FLUX, ("euler",)),
        ("FluxInpaintPipeline", "inpaint", 28, 7.0, 0.6, True, _FLUX | _CROP, ("euler",)),
        ("FluxFillPipeline", "inpaint", 50, 30.0, 1.0, True, _FILL, ("euler",)),
    ],
}  # fmt: skip
"""Read from diffusers 0.42.1's `__call__` signatures (`python -m workers.builtin.defaults`)."""


def _family(name: str, title: str, denoiser: str, **traits: Any) -> Family:
    pipelines: dict[str, Pipeline] = {}
    auto: dict[str, str] = {}
    for class_name, kind, steps, guidance, strength, size, args, schedulers in _PIPELINES[name]:
        defaults = {"num_inference_steps": steps, "guidance_scale": guidance}
        if strength is not None:
            defaults["strength"] = strength
        pipelines[class_name] = Pipeline(
            class_name, kind, _frozen(defaults), _frozen(args), size, schedulers
        )
        auto.setdefault(kind, class_name)
    return Family(name, title, denoiser, _frozen(pipelines), _frozen(auto), **traits)


_FLOW_TRAITS = {"schedulers": FLOW_SCHEDULERS, "patch_size": 2}
_KARRAS_TRAITS = {"schedulers": KARRAS_SCHEDULERS, "patch_size": 1, "fixed_sample_size": None}
_FAMILIES = [
    _family(
        "sd",
        "Stable Diffusion 1.x/2.x",
        "unet",
        **_KARRAS_TRAITS,
        negative_matters=False,
        trainable=True,
        ip_adapter=True,
    ),
    _family(
        "sdxl",
        "Stable Diffusion XL",
        "unet",
        **_KARRAS_TRAITS,
        negative_matters=True,
        trainable=True,
        ip_adapter=True,
    ),
    _family(
        "sd3",
        "Stable Diffusion 3/3.5",
        "transformer",
        **_FLOW_TRAITS,
        fixed_sample_size=None,
        negative_matters=False,
        trainable=True,
        ip_adapter=False,
    ),
    _family(
        "flux",
        "FLUX.1",
        "transformer",
        **_FLOW_TRAITS,
        fixed_sample_size=128,
        negative_matters=True,
        trainable=True,
        ip_adapter=False,
    ),
]

FAMILIES: Mapping[str, Family] = _frozen({f.name: f for f in _FAMILIES})
"""Every family the farm renders, by name: `sd`, `sdxl`, `sd3`, `flux`."""

DEDICATED_INPAINT = ("FluxFillPipeline",)
"""Pipeline classes that are a dedicated inpainting model of their own (no AutoPipeline maps
them: FLUX.1 Fill takes the masked image and mask as extra input channels)."""


def family_of_class(class_name: str | None) -> Family | None:
    """The family a diffusers pipeline class (`model_index.json`'s `_class_name`) belongs to."""
    for family in FAMILIES.values():
        if class_name in family.pipelines:
            return family
    return None


# --------------------------------------------------------------------------- a model


@dataclass(frozen=True)
class ModelInfo:
    """What one model is, from its `model_index.json` and configs: enough to say which kinds it
    runs, with which pipeline, arguments, defaults, sizes and schedulers."""

    family: str
    pipeline: str
    """Its own pipeline class (`model_index.json`'s `_class_name`)."""
    in_channels: int | None = None
    """The denoiser's input channels: 9 for a dedicated SD/SDXL inpainting UNet."""
    default_size: int | None = None
    """Its pipelines' default height and width: the denoiser's `sample_size` (FLUX.1: 128)
    times the VAE's scale. None: unknown here (the worker knows)."""
    vae_scale: int | None = None
    """2 ** (VAE down blocks − 1): 8 for every released model, 2 for the built-ins."""
    text_encoder: bool = True
    """False for a model without the first text encoder (the SDXL refiner): no txt2img."""

    @property
    def traits(self) -> Family:
        """Its family's row of `FAMILIES`."""
        return FAMILIES[self.family]

    @property
    def inpaint(self) -> str:
        """How it inpaints: `blend` (any 4-channel model: its family's inpaint pipeline blends
        latents), `9-channel` (a dedicated UNet) or `fill` (FLUX.1 Fill)."""
        if self.pipeline in DEDICATED_INPAINT:
            return "fill"
        return "9-channel" if self.in_channels == 9 else "blend"

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every job kind it runs: pipeline kinds, then `style` and `finetune` where its family
        can (`Family.ip_adapter`, `Family.trainable`)."""
        if self.inpaint != "blend":
            return ("inpaint",)
        kinds = list(RENDER_KINDS) if self.text_encoder else ["img2img", "inpaint"]
        if self.traits.ip_adapter and self.text_encoder:  # IP-Adapters are made for bases
            kinds.append("style")
        if self.traits.trainable and self.text_encoder:
            kinds.append("finetune")
        return tuple(kinds)

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this: VAE scale × the denoiser's patch
        (16 for SD3 and FLUX.1; the farm's 8 for SD and SDXL)."""
        return max(8, (self.vae_scale or 8) * self.traits.patch_size)

    def pipeline_for(self, kind: str) -> Pipeline:
        """The pipeline a job of `kind` runs on this model (`check_kind` first)."""
        return self.traits.pipeline_for(kind, self.pipeline)

    def describe(self) -> str:
        """`sdxl (StableDiffusionXLPipeline)`, for messages."""
        return f"{self.family} ({self.pipeline})"

    def check_kind(self, kind: str, ref: str, field: str = "model") -> None:
        """`InvalidJob` unless this model runs jobs of `kind`, naming what it does run."""
        if kind in self.kinds:
            return
        why = {
            "9-channel": "an inpainting model (9-channel UNet)",
            "fill": "an inpainting model (FLUX.1 Fill)",
        }.get(self.inpaint, f"a {self.traits.title} model")
        if self.inpaint == "blend" and not self.text_encoder:
            why += " without its first text encoder (a refiner)"
        elif kind == "style" and self.inpaint == "blend":
            why += " and style (IP-Adapter) jobs do not run on that family yet"
        elif kind == "finetune" and self.inpaint == "blend":
            why += " and LoRA fine-tunes do not run on that family yet"
        runs = (
            f"{self.kinds[0]} jobs only"
            if len(self.kinds) == 1
            else f"{', '.join(self.kinds)} jobs"
        )
        hint = ""
        if self.kinds == ("inpaint",):
            hint = "; give the job an image and a mask (inpaint), or use a model of another kind"
        raise InvalidJob(
            f"{field}: {ref!r} is {why}: it runs {runs}, not {kind}{hint}", field=field
        )

    def check_finetune(self, resolution: int, ref: str) -> None:
        """`InvalidJob` unless this model trains (`check_kind`) at `resolution`: a multiple of
        `size_multiple` (FLUX.1 packs 2×2 latent patches, SD3 embeds them)."""
        self.check_kind("finetune", ref)
        if resolution % self.size_multiple:
            raise InvalidJob(
                f"resolution: must be a multiple of {self.size_multiple} for {ref!r} (a "
                f"{self.traits.title} model), got {resolution}",
                field="resolution",
            )


def _builtin(family: str, pipeline: str, in_channels: int, sample: int) -> ModelInfo:
    return ModelInfo(family, pipeline, in_channels, sample * 2, vae_scale=2)


BUILTIN_INFO: Mapping[str, ModelInfo] = _frozen(
    {
        "tiny": _builtin("sd", "StableDiffusionPipeline", 4, 32),
        "tiny-inpaint": _builtin("sd", "StableDiffusionInpaintPipeline", 9, 32),
        "tiny-sdxl": _builtin("sdxl", "StableDiffusionXLPipeline", 4, 32),
        "tiny-sdxl-inpaint": _builtin("sdxl", "StableDiffusionXLInpaintPipeline", 9, 32),
        "tiny-sd3": _builtin("sd3", "StableDiffusion3Pipeline", 16, 32),
        "tiny-flux": _builtin("flux", "FluxPipeline", 64, 128),
        "tiny-flux-fill": _builtin("flux", "FluxFillPipeline", 144, 128),
    }
)
"""Each built-in model (`farm.jobs.refs.BUILTIN_MODELS`) as `ModelInfo`; the workers' tests
check it against the built pipelines."""


def info_from_configs(
    class_name: str | None,
    denoiser: Mapping[str, Any] | None = None,
    vae: Mapping[str, Any] | None = None,
    *,
    text_encoder: bool = True,
) -> ModelInfo | None:
    """A model's `ModelInfo` from its pipeline class and its denoiser's and VAE's configs (the
    folder's `unet/` or `transformer/` and `vae/` `config.json`), or None for a pipeline class
    of no family the farm knows."""
    family = family_of_class(class_name)
    if family is None or class_name is None:
        return None
    denoiser = denoiser or {}
    vae_blocks = (vae or {}).get("block_out_channels")
    vae_scale = 2 ** (len(vae_blocks) - 1) if isinstance(vae_blocks, list) and vae_blocks else None
    sample = family.fixed_sample_size or denoiser.get("sample_size")
    if isinstance(sample, list):  # a (height, width) sample size: diffusers' SD reads [0]
        sample = sample[0]
    default_size = sample * vae_scale if isinstance(sample, int) and vae_scale else None
    in_channels = denoiser.get("in_channels")
    return ModelInfo(
        family.name,
        class_name,
        in_channels if isinstance(in_channels, int) else None,
        default_size,
        vae_scale,
        text_encoder,
    )
