"""Models for offline nodes: pull Hub repos into the local Hugging Face cache, list what it holds.

GPU workers never download (`HF_HUB_OFFLINE=1`): a node is filled ahead of time, once, and the
farm then resolves `org/name` refs from the cache alone.

    $ farm models pull stable-diffusion-v1-5/stable-diffusion-v1-5      # prints the snapshot
    $ farm models list                                                  # built-ins, cache, sizes

`pull` fetches safetensors weights and the configs and tokenizer files around them, nothing
pickled (the farm never loads pickle weights, so they would only take up disk). It is
huggingface_hub's own `snapshot_download`: an interrupted pull resumes where it stopped, and a
second pull of the same revision downloads nothing.

Light: huggingface_hub is imported by these functions only, never torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from farm.errors import InvalidJob
from farm.inputs.models import hf_cache_dir
from farm.jobs.refs import is_repo_id

PULL_PATTERNS = (
    "*.safetensors",
    "*.json",  # model_index.json, configs, tokenizer.json, vocab.json
    "*.txt",  # merges.txt, vocab.txt
    "*.model",  # sentencepiece tokenizers
)
"""What `pull` fetches: weights as safetensors, and every config and tokenizer file."""


def pull(ref: str, revision: str | None = None) -> Path:
    """Fetch `org/name[@revision]` into the local Hugging Face cache; its snapshot folder."""
    if not is_repo_id(ref):
        raise InvalidJob(
            f"model: {ref!r} is not a Hub repo id (org/name[@revision])", field="model"
        )
    repo_id, _, at = ref.partition("@")
    if revision and at and revision != at:
        raise InvalidJob(
            f"revision: {ref!r} names {at!r}, but --revision says {revision!r}", field="revision"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise InvalidJob(
            "HF_HUB_OFFLINE is set here: pull on a machine that may reach the Hub (unset it)",
            field="model",
        )
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo_id, revision=revision or at or None, allow_patterns=list(PULL_PATTERNS)
    )
    return Path(folder)


def components_without_weights(folder: Path) -> list[str]:
    """Components of a pulled pipeline whose weights are not safetensors (so were not pulled)."""
    missing = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (sub / "config.json").is_file() and not any(sub.glob("*.safetensors")):
            missing.append(sub.name)
    return missing


@dataclass(frozen=True)
class CachedModel:
    """A model repo in the local Hugging Face cache."""

    repo_id: str
    size: int
    """Bytes on disk, blobs shared between revisions counted once."""
    revisions: list[tuple[str, list[str], int]]
    """(commit, refs pointing at it, bytes of that snapshot), newest first."""


def cached_models() -> list[CachedModel]:
    """Every model repo in the local Hugging Face cache (none when there is no cache)."""
    cache = hf_cache_dir()
    if not cache.is_dir():
        return []
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    models = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        models.append(
            CachedModel(
                repo.repo_id,
                repo.size_on_disk,
                [(r.commit_hash, sorted(r.refs), r.size_on_disk) for r in revisions],
            )
        )
    return models


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
