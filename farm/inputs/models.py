"""What the submitting side can tell about a model ref, without torch.

Workers resolve refs and refuse what they must never load. Where the submitter can see the
model too (a local folder or file, or the local Hugging Face cache), `check_visible_model`
refuses the same things before anything is stored or enqueued: shipped Python code (remote
code is never run) and pickle-only weights (only safetensors are loaded).

What kinds of job a model runs is told from what the client can see too (`check_kind`): a
built-in's name, a folder's `model_index.json` (`_class_name`) and `unet/config.json`
(`in_channels`), a single file's safetensors header. An inpainting model (a 9-channel UNet,
an `...InpaintPipeline`, FLUX.1 Fill) runs inpaint jobs only, so `farm submit txt2img --model
tiny-inpaint` is refused at submit rather than failed by a worker.

A repo id (`org/name`) that is neither a local path nor in the local Hugging Face cache is
refused too, when this machine has a cache at all (`check_resolvable`): a submitter that shares
the workers' cache learns of a typo before a thousand jobs queue behind it. A submit-only box
with a cache of its own turns that off (`FARM_MODEL_CHECK=0`); then the first worker that
cannot resolve the ref fails the job with the same reason (never a retry, never a stuck queue).

What a model is (`model_info`, `family_of`: its family, the kinds it runs, its default size) is
read from what the submitter can see too: a built-in's row of `farm.jobs.families.BUILTIN_INFO`,
a folder's (or cached snapshot's) `model_index.json` and denoiser and VAE configs, a single-file
checkpoint's `.config/` folder or, failing that, its safetensors header. None where it cannot
tell: then the worker resolves the job against the pipeline it loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from farm.errors import InvalidJob
from farm.jobs.families import BUILTIN_INFO, FAMILIES, ModelInfo, info_from_configs
from farm.jobs.refs import BUILTIN_MODELS, is_repo_id

_PICKLE = {".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"}


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache, where `huggingface_hub` would look."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "hub"


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of `org/name[@revision]`, or None if not cached here."""
    repo = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    ref = revision or "main"
    ref_file = repo / "refs" / ref
    commit = ref_file.read_text().strip() if ref_file.is_file() else ref
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def local_path(ref: str, models_dir: Path | None = None, *, field: str = "model") -> Path:
    """Where a local model ref points: under `models_dir` when one is set (relative refs),
    resolved. With `models_dir` set, every local path, absolute or relative, must lie inside
    it once symlinks are resolved: the one containment rule, at submit and on workers."""
    path = Path(ref).expanduser()
    if models_dir is None:
        return path.resolve()
    root = Path(models_dir).expanduser().resolve()
    full = (root / path).resolve()  # an absolute `path` replaces `root` here
    if not full.is_relative_to(root):
        raise InvalidJob(
            f"{field} {ref!r}: resolves outside the models folder {str(root)!r} (FARM_MODELS_DIR)",
            field=field,
        )
    return full


def visible_model(ref: str, models_dir: Path | None = None) -> Path | None:
    """The file or folder `ref` names, if this machine can see it; None otherwise.
    `InvalidJob` for a path that leaves `models_dir`."""
    if ref in BUILTIN_MODELS:
        return None
    path = local_path(ref, models_dir)
    if path.exists():
        return path
    if is_repo_id(ref):
        repo_id, _, revision = ref.partition("@")
        return cached_snapshot(repo_id, revision or None)
    return None


def check_resolvable(
    ref: str | None, check: bool = True, models_dir: Path | None = None, *, field: str = "model"
) -> None:
    """Refuse a repo id this machine's Hugging Face cache does not hold, when it has a cache.

    Built-in names and paths pass (a path may be the workers' own, not this machine's).
    """
    if ref is None or not check or not is_repo_id(ref) or not hf_cache_dir().is_dir():
        return
    if visible_model(ref, models_dir) is not None:
        return  # a local folder of that name, or the cached snapshot
    repo_id, _, revision = ref.partition("@")
    where = f" at revision {revision!r}" if revision else ""
    raise InvalidJob(
        f"{field}: {ref!r} is not built in, not a local folder, and {repo_id!r}{where} is not in "
        f"the local Hugging Face cache ({hf_cache_dir()}); fetch it first with "
        f"`farm models pull {ref}` (or set FARM_MODEL_CHECK=0 if the workers' cache differs)",
        field=field,
    )


def check_visible_model(ref: str, models_dir: Path | None = None, check: bool = True) -> None:
    """Refuse a model this machine can see that a worker would refuse to load, and (with
    `check`) a repo id missing from this machine's Hugging Face cache."""
    path = visible_model(ref, models_dir)
    if path is None:
        check_resolvable(ref, check, models_dir)
        return
    if path.is_file():
        return  # the worker resolves it; a file ref's suffix is checked by the spec
    index = path / "model_index.json"
    if not index.is_file():
        raise InvalidJob(f"model: {ref!r} is a folder without model_index.json", field="model")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except ValueError as e:
        raise InvalidJob(
            f"model: {ref!r} has an unreadable model_index.json ({e})", field="model"
        ) from None
    code = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.py"))
    if code or not isinstance(class_name, str):
        shown = ", ".join(code[:3]) or f"_class_name {class_name!r}"
        raise InvalidJob(
            f"model: {ref!r} needs remote code ({shown}); the farm never runs a model's own code",
            field="model",
        )
    for folder in [p for p in path.iterdir() if p.is_dir()]:
        suffixes = {f.suffix for f in folder.iterdir() if f.is_file()}
        if suffixes & _PICKLE and ".safetensors" not in suffixes:
            raise InvalidJob(
                f"model: {ref!r} has only pickle weights in {folder.name}/; only .safetensors is loaded",
                field="model",
            )


# --------------------------------------------------------------------------- what a model is


def family_of(ref: str, models_dir: Path | None = None) -> str | None:
    """The family (`sd`, `sdxl`, `sd3`, `flux`) of a model this machine can see, or None."""
    info = model_info(ref, models_dir)
    return info.family if info is not None else None


def model_info(ref: str, models_dir: Path | None = None) -> ModelInfo | None:
    """What the model `ref` is, read from what this machine can see; None where it cannot tell
    (a path or repo only the workers see, a pipeline of no family the farm knows)."""
    ref = ref.strip()
    if ref in BUILTIN_INFO:
        return BUILTIN_INFO[ref]
    path = visible_model(ref, models_dir)
    if path is None:
        return None
    if path.is_dir():
        return folder_info(path)
    beside = path.with_suffix(".config")  # where the workers look first, too
    if (beside / "model_index.json").is_file():
        return folder_info(beside)
    return single_file_info(path)


def folder_info(folder: Path) -> ModelInfo | None:
    """A diffusers folder's `ModelInfo`, from `model_index.json` and its components' configs."""
    index = _json(folder / "model_index.json")
    if index is None:
        return None
    class_name = index.get("_class_name")
    info = info_from_configs(class_name if isinstance(class_name, str) else None)
    if info is None:
        return None
    first_encoder = index.get("text_encoder")  # [null, null] in the SDXL refiner's
    return info_from_configs(
        info.pipeline,
        _json(folder / info.traits.denoiser / "config.json"),
        _json(folder / "vae" / "config.json"),
        text_encoder=not (isinstance(first_encoder, list) and first_encoder[:1] == [None]),
    )


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_SINGLE_FILE_KEYS = (
    # (family, a key only its original-layout checkpoints hold), most specific first; from
    # diffusers' `single_file_utils.CHECKPOINT_KEY_NAMES`.
    ("flux", "double_blocks.0.img_attn.norm.key_norm.scale"),
    ("sd3", "joint_blocks.0.context_block.adaLN_modulation.1.bias"),
    ("sdxl", "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"),
    ("sdxl", "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"),
    ("sd", "model.diffusion_model.input_blocks.0.0.weight"),
)
_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def single_file_info(path: Path) -> ModelInfo | None:
    """A single-file checkpoint's family and input channels, from its safetensors header."""
    header = safetensors_header(path)
    if header is None:
        return None
    names = set(header)
    found = [f for f, key in _SINGLE_FILE_KEYS if {key, f"model.diffusion_model.{key}"} & names]
    if not found:
        return None
    family = found[0]
    row = FAMILIES[family]
    conv_in = header.get(_CONV_IN, {}).get("shape") or [None, None]
    in_channels = conv_in[1] if family in ("sd", "sdxl") else None
    refiner = family == "sdxl" and not any(k.startswith("conditioner.embedders.1") for k in names)
    img_in = header.get("img_in.weight") or header.get("model.diffusion_model.img_in.weight") or {}
    fill = family == "flux" and (img_in.get("shape") or [0, 0])[1] == 384
    kind = "inpaint" if in_channels == 9 or fill else ("img2img" if refiner else "txt2img")
    pipeline = "FluxFillPipeline" if fill else row.auto[kind]
    return ModelInfo(family, pipeline, in_channels, text_encoder=not refiner)


def safetensors_header(path: Path) -> dict | None:
    """A safetensors file's JSON header (tensor name → dtype, shape, offsets), read without
    torch and without reading its tensors; None if it is not one."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def check_kind(ref: str, kind: str, models_dir: Path | None = None) -> None:
    """Refuse a job whose model, as this machine sees it, cannot run its kind (a 9-channel or
    Fill inpainting model asked for txt2img, a family without style or fine-tunes), by the one
    rule `ModelInfo.check_kind`. Models the client cannot see pass; the first worker refuses
    them as `InvalidJob`."""
    try:
        info = model_info(ref, models_dir)
    except InvalidJob:
        return  # refused elsewhere, with its own reason
    if info is not None:
        info.check_kind(kind, ref)
