"""What the submitting side can tell about a model ref, without torch.

Workers resolve refs and refuse what they must never load. Where the submitter can see the
model too (a local folder or file, or the local Hugging Face cache), `check_visible_model`
refuses the same things before anything is stored or enqueued: shipped Python code (remote
code is never run) and pickle-only weights (only safetensors are loaded).

A repo id (`org/name`) that is neither a local path nor in the local Hugging Face cache is
refused too, when this machine has a cache at all (`check_resolvable`): a submitter that shares
the workers' cache learns of a typo before a thousand jobs queue behind it. A submit-only box
with a cache of its own turns that off (`FARM_MODEL_CHECK=0`); then the first worker that
cannot resolve the ref fails the job with the same reason (never a retry, never a stuck queue).
"""

from __future__ import annotations

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
