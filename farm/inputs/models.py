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
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from farm.errors import InvalidJob
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


INPAINT_ONLY_BUILTINS = {
    "tiny-inpaint": "a 9-channel UNet",
    "tiny-sdxl-inpaint": "a 9-channel UNet",
    "tiny-flux-fill": "FLUX.1 Fill",
}
"""Built-ins that run inpaint jobs only, and why (for the message)."""

_ORIGINAL_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
"""A single-file (original layout) Stable Diffusion checkpoint's first UNet conv: its input
channels are 9 for an inpainting model."""


def check_kind(ref: str, kind: str, models_dir: Path | None = None) -> None:
    """Refuse a job whose model, as this machine sees it, cannot run its kind: an inpainting
    model (`inpainting_model`) asked for anything but inpaint. Models the client cannot see
    pass; the first worker refuses them as `InvalidJob`."""
    if kind == "inpaint":
        return
    why = inpainting_model(ref, models_dir)
    if why is not None:
        raise InvalidJob(
            f"model: {ref!r} is an inpainting model ({why}): it runs inpaint jobs only, not "
            f"{kind}; give the job an image and a mask (inpaint), or use "
            f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} model such as 'tiny'",
            field="model",
        )


@functools.lru_cache(maxsize=256)
def inpainting_model(ref: str, models_dir: Path | None = None) -> str | None:
    """Why `ref` is an inpaint-only model (`a 9-channel UNet`), or None when it is not, or
    this machine cannot tell. Read once per ref and process."""
    if ref in INPAINT_ONLY_BUILTINS:
        return INPAINT_ONLY_BUILTINS[ref]
    try:
        path = visible_model(ref, models_dir)
    except InvalidJob:
        return None  # refused elsewhere, with its own reason
    if path is None:
        return None
    if path.is_file():
        return "a 9-channel UNet" if _single_file_in_channels(path) == 9 else None
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        name = str(index.get("_class_name", ""))
    except (OSError, ValueError):
        return None
    if "Inpaint" in name or "Fill" in name:
        return name
    try:
        unet = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return "a 9-channel UNet" if unet.get("in_channels") == 9 else None


def _single_file_in_channels(path: Path) -> int | None:
    """The UNet's input channels from a single-file checkpoint's safetensors header (the
    JSON before the tensors: no torch, no weights read)."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100 << 20:
                return None
            header = json.loads(f.read(size))
        shape = header.get(_ORIGINAL_CONV_IN, {}).get("shape")
    except (OSError, ValueError, AttributeError):
        return None
    return int(shape[1]) if isinstance(shape, list) and len(shape) == 4 else None
