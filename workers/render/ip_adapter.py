"""IP-Adapters for style jobs: resolved and loaded once per model, attached for one call.

diffusers' `load_ip_adapter` rewires the UNet for good: every cross-attention processor
becomes an `IPAdapterAttnProcessor` and `unet.encoder_hid_proj` projects the reference image.
The `PipelineCache` shares one UNet across txt2img, img2img and inpaint, and a pipeline whose
UNet carries an adapter demands `ip_adapter_image` on every call (`set_ip_adapter_scale(0)`
does not take it away). So the adapter is loaded once, by diffusers itself, then its pieces are
kept aside and the UNet given back its own processors; a style call puts the pieces in and
takes them out again (`LoadedIPAdapter.attached`). That swap is a few dict assignments, and a
plain render before and after a style job gets the same pixels. The other way, a style
pipeline with a UNet of its own, would hold every model's UNet twice.

    >>> adapter = load_for(cache, spec)               # once per (model, adapter) and process
    >>> with adapter.attached(spec.ip_adapter_scale):
    ...     adapter.pipe(prompt=..., image=content, ip_adapter_image=style, ...)

Refs (`Style.ip_adapter`), each with its image encoder (a CLIP vision model, safetensors):

    tiny-ip-adapter          built in (`workers.builtin.tiny_ip_adapter`), no files at all
    tiny-sdxl-ip-adapter     built in, for `tiny-sdxl` (`workers.builtin.sdxl_ip_adapter`)
    org/name[@revision]      the local Hugging Face cache only, never the network
    path/to/folder           a folder with the weights (`ip_adapter_weight_name`, else its one
                             top-level .safetensors) and `image_encoder/` beside them
    path/to/weights.safetensors   the weights, with `image_encoder/` beside the file

The style pipeline is the model family's own img2img pipeline (`farm.jobs.families`:
`StableDiffusionImg2ImgPipeline` for SD 1.x/2.x, `StableDiffusionXLImg2ImgPipeline` for SDXL),
built over the warm pipeline's components with `from_pipe(base, image_encoder=…)`, so a style
job on SDXL gets SDXL's prompts, size conditioning and defaults, as diffusers' `load_ip_adapter`
on that pipeline does. Families whose denoiser diffusers' loader cannot condition (SD3, FLUX.1:
`Family.ip_adapter` off) are refused (`InvalidJob`) before anything loads.

The loaded adapter lives on the UNet it was loaded into, so it goes when the model is evicted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline

from farm.errors import InvalidJob
from farm.inputs.hub import PULL_PATTERNS
from farm.inputs.models import local_path
from farm.jobs.families import ModelInfo
from farm.jobs.refs import BUILTIN_IP_ADAPTERS, check_ip_adapter_ref, is_repo_id
from farm.jobs.specs import Style

_HELD = "_farm_ip_adapters"
"""The attribute of a UNet that holds the adapters loaded into it: source → LoadedIPAdapter."""
_IP_IMAGE_PROJ = "ip_image_proj"


@dataclass(frozen=True)
class AdapterSource:
    """Where an IP-Adapter's weights and image encoder are (or which built-in). Two refs to
    the same files share one load."""

    ref: str = field(compare=False)
    weights: str | None = None
    image_encoder: str | None = None
    builtin: str | None = None


def resolve_ip_adapter(
    ref: str, weight_name: str | None = None, models_dir: Path | None = None
) -> AdapterSource:
    """Where `ref` points, or `InvalidJob` naming it. Reads only local files."""
    ref = ref.strip()
    if ref in BUILTIN_IP_ADAPTERS:
        return AdapterSource(ref, builtin=ref)
    try:
        check_ip_adapter_ref(ref)
    except ValueError as e:
        raise _invalid(ref, str(e)) from None
    path = local_path(ref, models_dir, field="ip_adapter")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise _invalid(ref, "only .safetensors IP-Adapter weights are loaded")
        weights = path
    else:
        folder = path if path.is_dir() else _cached_folder(ref)
        weights = _weights_in(ref, folder, weight_name)
    encoder = weights.parent / "image_encoder"
    if not (encoder / "config.json").is_file() or not any(encoder.glob("*.safetensors")):
        raise _invalid(
            ref,
            f"no image encoder beside its weights: {str(encoder)!r} needs a config.json and "
            ".safetensors weights",
        )
    return AdapterSource(ref, str(weights), str(encoder))


def _invalid(ref: str, message: str) -> InvalidJob:
    return InvalidJob(f"ip_adapter {ref!r}: {message}", field="ip_adapter")


def _cached_folder(ref: str) -> Path:
    from huggingface_hub import snapshot_download

    if not is_repo_id(ref):
        raise _invalid(ref, "no such file or folder")
    repo_id, _, revision = ref.partition("@")
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision or None,
                local_files_only=True,
                allow_patterns=list(PULL_PATTERNS),
            )
        )
    except Exception as e:
        raise _invalid(
            ref,
            f"not a local folder, and {repo_id!r} is not in the local Hugging Face cache; workers "
            f"never download (fetch it first: `farm models pull {ref}`) [{type(e).__name__}]",
        ) from None


def _weights_in(ref: str, folder: Path, weight_name: str | None) -> Path:
    if weight_name is not None:
        weights = (folder / weight_name).resolve()
        if not weights.is_relative_to(folder.resolve()) or not weights.is_file():
            raise _invalid(ref, f"no weights file {weight_name!r} in {str(folder)!r}")
        return weights
    found = sorted(folder.glob("*.safetensors"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise _invalid(
            ref,
            f"{str(folder)!r} has {len(found)} top-level .safetensors files ({names}); name the "
            "weights with ip_adapter_weight_name",
        )
    return found[0]


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedIPAdapter:
    """An IP-Adapter loaded for one model: a style pipeline over the model's own components
    (plus the image encoder and its feature extractor), and the UNet parts that diffusers'
    loader made, kept aside while no style job runs."""

    source: AdapterSource
    pipe: DiffusionPipeline
    processors: dict[str, Any]
    encoder_hid_proj: torch.nn.Module

    @contextmanager
    def attached(self, scale: float) -> Iterator[DiffusionPipeline]:
        """The style pipeline, its UNet conditioned on the adapter at `scale`, for one call."""
        unet = self.pipe.unet
        own = (unet.attn_processors, unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)
        unet.set_attn_processor(dict(self.processors))  # it pops from the dict it is given
        unet.encoder_hid_proj = self.encoder_hid_proj
        unet.config.encoder_hid_dim_type = _IP_IMAGE_PROJ
        try:
            self.pipe.set_ip_adapter_scale(scale)
            yield self.pipe
        finally:
            unet.set_attn_processor(own[0])
            unet.encoder_hid_proj = own[1]
            unet.config.encoder_hid_dim_type = own[2]


def load_for(cache: Any, spec: Style) -> LoadedIPAdapter:
    """The adapter `spec` asks for, loaded into its model's warm pipeline once per process."""
    assert spec.ip_adapter is not None
    info = cache.info(spec.model)
    info.check_kind("style", spec.model)  # a model the client could not see: refused here
    base = cache.get(spec.model, "img2img")
    source = resolve_ip_adapter(spec.ip_adapter, spec.ip_adapter_weight_name, cache.models_dir)
    held: dict[AdapterSource, LoadedIPAdapter] = base.unet.__dict__.setdefault(_HELD, {})
    if source not in held:
        held[source] = _load(base, info, source)
    return held[source]


def _load(base: DiffusionPipeline, info: ModelInfo, source: AdapterSource) -> LoadedIPAdapter:
    """Load with diffusers' own `load_ip_adapter`, then hand the UNet its own parts back."""
    # 1. The weights, in the original layout, and the image encoder: safetensors only.
    weights, encoder = _read(source)
    encoder = encoder.to(device=base.device, dtype=base.dtype).eval()
    # 2. A style pipeline over the model's own components, with the image encoder added: the
    #    family's img2img pipeline (SDXL's for an SDXL model).
    style_class = getattr(diffusers, info.pipeline_for("style").class_name)
    pipe = style_class.from_pipe(base, image_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    own = (unet.attn_processors, unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)
    # 3. diffusers converts and loads the adapter into the UNet (and adds the feature extractor).
    try:
        pipe.load_ip_adapter(weights, subfolder="", weight_name="")
        loaded = LoadedIPAdapter(source, pipe, unet.attn_processors, unet.encoder_hid_proj)
    except (KeyError, RuntimeError, ValueError) as e:
        raise _invalid(source.ref, f"does not fit this model's UNet: {e}") from e
    finally:
        # 4. The UNet's own processors back: the adapter is attached per style call only.
        unet.set_attn_processor(own[0])
        unet.encoder_hid_proj = own[1]
        unet.config.encoder_hid_dim_type = own[2]
    return loaded


def _read(source: AdapterSource) -> tuple[dict[str, dict[str, torch.Tensor]], Any]:
    if source.builtin == "tiny-sdxl-ip-adapter":
        from workers.builtin.sdxl_ip_adapter import build_sdxl_ip_adapter

        return build_sdxl_ip_adapter()
    if source.builtin is not None:
        from workers.builtin.tiny_ip_adapter import build_tiny_ip_adapter

        return build_tiny_ip_adapter()
    from safetensors import safe_open
    from transformers import CLIPVisionModelWithProjection

    weights: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    try:
        with safe_open(source.weights, framework="pt", device="cpu") as f:
            for key in list(f.keys()):  # a safetensors handle, not a dict
                part, _, name = key.partition(".")
                if part in weights:
                    weights[part][name] = f.get_tensor(key)
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            source.image_encoder, use_safetensors=True, local_files_only=True
        )
    except Exception as e:
        raise _invalid(source.ref, f"could not be read: {e}") from e
    if not weights["image_proj"] or not weights["ip_adapter"]:
        raise _invalid(source.ref, "the weights have no image_proj.* and ip_adapter.* tensors")
    if any("lora" in name for name in weights["ip_adapter"]):
        raise _invalid(source.ref, "FaceID IP-Adapters (with LoRA weights) are not supported")
    return weights, encoder
