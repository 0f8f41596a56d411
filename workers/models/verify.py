"""`farm models verify REF`: will a worker load this ref, and what kind of model is it?

A bad ref should fail here, once, not on the first of a thousand queued jobs. The ref is
resolved as a worker resolves it (`resolve_model`, `resolve_ip_adapter`: local files and the
local Hugging Face cache only), every torch component is built from its config with empty
weights (`accelerate.init_empty_weights`: no memory, no time), and the safetensors headers are
read to check that they cover every parameter and buffer at its shape (a tied weight, such as
T5's `shared` / `encoder.embed_tokens`, is saved once and counts as present). No weight is
loaded. UNet and transformer pipelines alike: the family and what the model runs come from the
family table (`farm.jobs.families`), as the submitting side reads them.

    >>> verify("org/name")
    Verdict(kind='inpaint (9-channel UNet)', location='…/snapshots/…', details=[…])

Kinds: `txt2img (4-channel UNet)` (also runs img2img and inpaint by blending, and style and
fine-tunes where its family can), `inpaint (9-channel UNet)` (a dedicated inpainting model:
inpaint jobs only), `txt2img (transformer)` (SD3, FLUX.1), `inpaint (FLUX.1 Fill transformer)`,
`img2img (refiner UNet)` (SDXL's refiner), `IP-Adapter`. The details name the family and list
the kinds, and whether IP-Adapter (style) jobs and LoRA fine-tunes run on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.errors import InvalidJob
from farm.jobs.families import BUILTIN_INFO, ModelInfo
from farm.jobs.refs import BUILTIN_IP_ADAPTERS, BUILTIN_MODELS

TXT2IMG = "txt2img (4-channel UNet)"
INPAINT = "inpaint (9-channel UNet)"
TRANSFORMER = "txt2img (transformer)"
FILL = "inpaint (FLUX.1 Fill transformer)"
REFINER = "img2img (refiner UNet)"
IP_ADAPTER = "IP-Adapter"


@dataclass
class Verdict:
    ref: str
    kind: str
    location: str
    details: list[str] = field(default_factory=list)
    info: ModelInfo | None = None
    """What the model is and runs (None for an IP-Adapter)."""


def kind_of(info: ModelInfo) -> str:
    """The verdict's one-word-and-a-note kind of a model."""
    if info.inpaint == "fill":
        return FILL
    if info.inpaint == "9-channel":
        return INPAINT
    if not info.text_encoder:
        return REFINER
    return TXT2IMG if info.traits.denoiser == "unet" else TRANSFORMER


def runs(info: ModelInfo) -> list[str]:
    """Lines saying the family and what the model runs."""
    names = {"inpaint": {"blend": "inpaint (blending latents)"}.get(info.inpaint, "inpaint")}
    kinds = [names.get(k, k) for k in info.kinds if k not in ("style", "finetune")]
    yes = {True: "yes", False: "no"}
    return [
        f"family: {info.family} ({info.traits.title}), {info.pipeline}",
        f"runs: {', '.join(kinds)}; IP-Adapter (style): {yes['style' in info.kinds]}; "
        f"trainable (LoRA fine-tune): {yes['finetune' in info.kinds]}",
    ]


def _model_verdict(ref: str, info: ModelInfo, location: str, details: list[str]) -> Verdict:
    return Verdict(ref, kind_of(info), location, [*runs(info), *details], info)


def verify(ref: str, models_dir: Path | None = None) -> Verdict:
    """What `ref` is, or `InvalidJob` saying why a worker could not load it."""
    ref = ref.strip()
    # 1. Built-ins: nothing on disk.
    if ref in BUILTIN_MODELS:
        return _model_verdict(ref, BUILTIN_INFO[ref], "built in", [BUILTIN_MODELS[ref]])
    if ref in BUILTIN_IP_ADAPTERS:
        return Verdict(ref, IP_ADAPTER, "built in", [BUILTIN_IP_ADAPTERS[ref]])
    # 2. Where it is, as a worker finds it: a diffusers folder (or cached snapshot), a
    #    single-file checkpoint, or an IP-Adapter's weights with their image encoder.
    from workers.models.pipelines import resolve_model
    from workers.render.ip_adapter import resolve_ip_adapter

    try:
        source = resolve_model(ref, models_dir)
    except InvalidJob as model_error:
        try:
            adapter = resolve_ip_adapter(ref, None, models_dir)
        except InvalidJob:
            raise model_error from None
        return _verify_ip_adapter(
            ref, Path(adapter.weights or ""), Path(adapter.image_encoder or "")
        )
    if source.kind == "single_file":
        return _verify_single_file(ref, Path(source.location), Path(source.config or ""))
    return _verify_pipeline(ref, Path(source.location))


# --------------------------------------------------------------------------- pipelines


def _verify_pipeline(ref: str, folder: Path) -> Verdict:
    from farm.inputs.models import folder_info
    from workers.models.pipelines import _pipeline_class

    cls = _pipeline_class(ref, folder)  # refuses custom pipelines and remote code
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    info = folder_info(folder)
    if info is None:
        raise InvalidJob(
            f"model {ref!r}: {cls.__name__} is of no family the farm renders (Stable Diffusion "
            "1.x/2.x, SDXL, SD3, FLUX.1)",
            field="model",
        )
    details = [f"{cls.__name__} in {folder}"]
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or None in value:
            continue
        module = _empty_module(ref, folder / name, *value)
        if module is None:
            continue  # a scheduler, tokenizer or processor: configs only
        n_tensors, n_bytes = _check_covers(ref, folder / name, module)
        details.append(
            f"{name}: {value[1]}, {n_tensors} tensors, {n_bytes / 1e6:.1f} MB: every weight present"
        )
    denoiser = info.traits.denoiser
    if not isinstance(index.get(denoiser), list) or None in index[denoiser]:
        raise InvalidJob(
            f"model {ref!r}: {cls.__name__} has no {denoiser}; {info.family} pipelines need one",
            field="model",
        )
    if denoiser == "unet" and info.in_channels not in (4, 9):
        raise InvalidJob(
            f"model {ref!r}: a {info.in_channels}-channel UNet is neither txt2img (4) nor "
            "inpaint (9)",
            field="model",
        )
    return _model_verdict(ref, info, str(folder), details)


def _empty_module(ref: str, folder: Path, library: str, class_name: str) -> Any:
    """The component built from its config with empty weights; None for non-torch parts."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    lib = {"diffusers": diffusers, "transformers": transformers}.get(library)
    cls = getattr(lib, class_name, None) if lib is not None else None
    if cls is None:
        return None
    try:
        if issubclass(cls, diffusers.ModelMixin):
            with init_empty_weights():
                return cls.from_config(cls.load_config(folder, local_files_only=True))
        if issubclass(cls, transformers.PreTrainedModel):
            config = cls.config_class.from_pretrained(folder, local_files_only=True)
            with init_empty_weights():
                module = cls(config)
                module.tie_weights()  # empty weights are tied only when asked again
                return module
    except Exception as e:
        raise InvalidJob(
            f"model {ref!r}: {folder.name}/ cannot be built from its config ({e})", field="model"
        ) from None
    return None


def _check_covers(ref: str, folder: Path, module: Any) -> tuple[int, int]:
    """Raise unless the folder's safetensors headers hold every tensor of `module` at its shape."""
    found = _headers(ref, folder)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for names in _tied(module):  # saved once, under any one of its names
        saved = [n for n in names if n in found]
        for name in names:
            if saved and name not in found:
                found[name] = found[saved[0]]
    missing = sorted(k for k in expected if k not in found)
    if missing and expected:  # saved with or without the model's own prefix
        prefix = getattr(module, "base_model_prefix", "") + "."
        renamed = {
            k.removeprefix(prefix) if k.startswith(prefix) else prefix + k: v
            for k, v in found.items()
        }
        if sum(k in renamed for k in expected) > sum(k in found for k in expected):
            found = renamed
            missing = sorted(k for k in expected if k not in found)
    where = f"model {ref!r}: {folder.name}/"
    if missing:
        raise InvalidJob(
            f"{where} weights lack {len(missing)} of {len(expected)} tensors ({', '.join(missing[:3])})",
            field="model",
        )
    wrong = [k for k, shape in expected.items() if found[k][0] != shape]
    if wrong:
        k = wrong[0]
        raise InvalidJob(
            f"{where} {len(wrong)} tensors have the wrong shape ({k}: {list(found[k][0])} in the "
            f"file, {list(expected[k])} in the config)",
            field="model",
        )
    return len(expected), sum(n for _, n in found.values())


def _tied(module: Any) -> list[list[str]]:
    """Groups of names that are one tied parameter (T5's `shared.weight` is also
    `encoder.embed_tokens.weight`): safetensors stores each such tensor once."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    tied = [names for names in groups.values() if len(names) > 1]
    declared = getattr(module, "_tied_weights_keys", None)  # transformers: target → source
    if isinstance(declared, dict):
        tied += [[target, source] for target, source in declared.items()]
    return tied


def _headers(ref: str, folder: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """Tensor name → (shape, bytes), from the headers of the folder's safetensors weights.

    Variant files (`*.fp16.safetensors`) count only where there is no plain file."""
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if f.name.count(".") == 1]
    if not files:
        raise InvalidJob(
            f"model {ref!r}: {folder.name}/ has no .safetensors weights", field="model"
        )
    return _read_headers(ref, plain or files)


def _read_headers(ref: str, files: list[Path]) -> dict[str, tuple[tuple[int, ...], int]]:
    from safetensors import safe_open

    sizes = {
        "F64": 8,
        "F32": 4,
        "F16": 2,
        "BF16": 2,
        "I64": 8,
        "I32": 4,
        "I16": 2,
        "I8": 1,
        "U8": 1,
        "BOOL": 1,
    }
    out = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in list(f.keys()):  # a safetensors handle, not a dict
                    s = f.get_slice(key)
                    shape = tuple(s.get_shape())
                    n = 1
                    for d in shape:
                        n *= d
                    out[key] = (shape, n * sizes.get(s.get_dtype(), 4))
        except Exception as e:
            raise InvalidJob(
                f"model {ref!r}: {path.name} is not a readable safetensors file ({e})",
                field="model",
            ) from None
    return out


# --------------------------------------------------------------------------- other layouts


def _verify_single_file(ref: str, path: Path, config: Path) -> Verdict:
    from farm.inputs.models import folder_info, single_file_info

    found = _read_headers(ref, [path])
    info = single_file_info(path)
    if info is None:
        raise InvalidJob(
            f"model {ref!r}: {path.name} holds no Stable Diffusion, SDXL, SD3 or FLUX.1 model",
            field="model",
        )
    if info.traits.denoiser == "unet" and info.in_channels not in (4, 9):
        raise InvalidJob(f"model {ref!r}: a {info.in_channels}-channel UNet", field="model")
    configured = folder_info(config)  # sizes and classes come from the config folder
    if configured is not None and configured.family == info.family:
        info = configured
    details = [f"single-file checkpoint, {len(found)} tensors; diffusers config from {config}"]
    return _model_verdict(ref, info, str(path), details)


def _verify_ip_adapter(ref: str, weights: Path, encoder_folder: Path) -> Verdict:
    from transformers import CLIPVisionModelWithProjection

    found = _read_headers(ref, [weights])
    proj = found.get("image_proj.proj.weight")
    layers = sorted({k.split(".")[1] for k in found if k.startswith("ip_adapter.")})
    if proj is None or not layers:
        raise InvalidJob(
            f"ip_adapter {ref!r}: {weights.name} has no image_proj.proj / ip_adapter.* weights "
            "(only the plain IP-Adapter layout is supported)",
            field="ip_adapter",
        )
    encoder = _empty_module(
        ref, encoder_folder, "transformers", CLIPVisionModelWithProjection.__name__
    )
    n_tensors, _ = _check_covers(ref, encoder_folder, encoder)
    embed_dim = proj[0][1]
    if encoder.config.projection_dim != embed_dim:
        raise InvalidJob(
            f"ip_adapter {ref!r}: its image encoder gives {encoder.config.projection_dim}-wide "
            f"embeddings, its projection takes {embed_dim}",
            field="ip_adapter",
        )
    details = [
        f"weights {weights.name}: image embeddings {embed_dim} → 4 tokens of "
        f"cross-attention dim {proj[0][0] // 4}, {len(layers)} attention layers",
        f"image encoder {encoder_folder.name}/: CLIP vision, {n_tensors} tensors, "
        f"{encoder.config.image_size}px: every weight present",
    ]
    return Verdict(ref, IP_ADAPTER, str(weights.parent), details)
