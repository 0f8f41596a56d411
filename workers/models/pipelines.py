"""Model refs → warm pipelines.

A ref is resolved once into a `ModelSource` (where the weights are), then loaded once into a
pipeline that stays warm in a `PipelineCache`. txt2img, img2img and inpaint share one set of
weights (diffusers' `from_pipe`), so a model costs one load whatever kind of job asks for it;
the pipeline each kind runs is the one its family's table names (`farm.jobs.families`: what
diffusers' AutoPipelines pick, or a dedicated model's own class, such as FLUX.1 Fill's).
Each model loads in the dtype the worker's `FARM_DTYPE` gives its family, and is placed on the
device whole or offloaded (`workers.models.precision`).

    >>> cache = PipelineCache(device="cpu", max_models=2)
    >>> pipe = cache.get("tiny", "img2img")         # loads `tiny` once
    >>> pipe = cache.get("tiny", "txt2img")         # same weights, no second load

Refs, and what each resolves to (`resolve_model`):

    tiny, tiny-sdxl, …         built in (`workers.builtin`), no files at all
    org/name[@revision]        the local Hugging Face cache only, never the network
    path/to/folder             a diffusers folder (with `model_index.json`)
    path/to/model.safetensors  one original-layout checkpoint; its diffusers config is the
                               folder `path/to/model.config/` beside it (`export_tiny` writes one)
                               or, failing that, the default diffusers repo for the checkpoint's
                               type (e.g. stable-diffusion-v1-5) when it is in the local HF cache

Relative paths resolve under `models_dir` when one is set (else the working directory). With
`models_dir` set, every local path, absolute or relative, must lie inside it once symlinks
are resolved. Only safetensors weights are loaded; pickle files are refused; remote code is
never trusted. Every ref that cannot be resolved or loaded is an `InvalidJob` naming it.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import diffusers
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.single_file_utils import SingleFileComponentError

from farm.errors import InvalidJob, TransientError
from farm.inputs.hub import PULL_PATTERNS
from farm.inputs.models import folder_info, local_path
from farm.jobs.families import BUILTIN_INFO, ModelInfo
from farm.jobs.refs import BUILTIN_MODELS, check_model_ref, is_repo_id
from workers.builtin.families import build_builtin
from workers.models.families import derive, info_of
from workers.models.precision import choose_dtype, place

KINDS = ("txt2img", "img2img", "inpaint")
_COMPONENT_LIBRARIES = ("diffusers", "transformers")
_CONFIG_SUFFIX = ".config"

SourceKind = Literal["builtin", "hub", "folder", "single_file"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are. Two refs that resolve to the same source share one load.

    `location` is the built-in name, or the local folder or file that is loaded (for `hub`, the
    snapshot folder in the HF cache). `revision` is, for `hub`, the commit that snapshot is.
    `config` is, for `single_file`, the diffusers folder its components are configured from.
    """

    kind: SourceKind
    location: str
    revision: str | None = None
    config: str | None = None


# --------------------------------------------------------------------------- resolving


def resolve_model(ref: str, models_dir: Path | None = None) -> ModelSource:
    """Where `ref` points, or `InvalidJob` naming it. Reads only local files."""
    ref = ref.strip()
    if ref in BUILTIN_MODELS:
        return ModelSource("builtin", ref)
    try:
        check_model_ref(ref)
    except ValueError as e:
        raise _invalid(ref, str(e)) from None

    path = local_path(ref, models_dir)  # the containment rule the submitter applies too
    explicit_path = ref.startswith(("/", "./", "../", "~")) or ref.endswith(".safetensors")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise _invalid(
                ref, f"folder {str(path)!r} is not a diffusers pipeline (no model_index.json)"
            )
        return ModelSource("folder", str(path))
    if path.is_file():
        if path.suffix != ".safetensors":
            raise _invalid(ref, "only diffusers folders and .safetensors checkpoints are loaded")
        return ModelSource("single_file", str(path), config=str(_single_file_config(ref, path)))
    if explicit_path or not is_repo_id(ref):
        raise _invalid(ref, f"no such file or folder: {str(path)!r}")
    return _resolve_hub(ref)


def _invalid(ref: str, message: str) -> InvalidJob:
    if repr(ref) not in message:
        message = f"model {ref!r}: {message}"
    return InvalidJob(message, field="model")


def _resolve_hub(ref: str) -> ModelSource:
    from huggingface_hub import snapshot_download

    repo_id, _, revision = ref.partition("@")
    try:
        # Complete is what `farm models pull` fetches: a snapshot without pickles is whole.
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision or None,
                local_files_only=True,
                allow_patterns=list(PULL_PATTERNS),
            )
        )
    except Exception as e:  # LocalEntryNotFoundError, RevisionNotFoundError, a bad repo id…
        where = f" at revision {revision!r}" if revision else ""
        raise _invalid(
            ref,
            f"{repo_id!r}{where} is not in the local Hugging Face cache; workers never download "
            f"(fetch it first with `farm models pull {ref}`) [{type(e).__name__}]",
        ) from None
    if not (folder / "model_index.json").is_file():
        raise _invalid(ref, f"the cached snapshot {str(folder)!r} is not a diffusers pipeline")
    return ModelSource("hub", str(folder), revision=folder.name)


def _single_file_config(ref: str, path: Path) -> Path:
    """The diffusers folder that configures a single-file checkpoint's components."""
    beside = path.with_suffix(_CONFIG_SUFFIX)
    if (beside / "model_index.json").is_file():
        return beside
    repo_id = _default_config_repo(ref, path)
    if repo_id is not None:
        from huggingface_hub import snapshot_download

        try:
            cached = Path(
                snapshot_download(
                    repo_id, local_files_only=True, allow_patterns=list(PULL_PATTERNS)
                )
            )
        except Exception:
            cached = None
        if cached is not None and (cached / "model_index.json").is_file():
            return cached
    default = f", or have {repo_id!r} in the local Hugging Face cache" if repo_id else ""
    raise _invalid(
        ref,
        f"a single-file checkpoint needs a diffusers config: put the model's diffusers folder "
        f"(configs, tokenizer, scheduler) at {str(beside)!r}{default}",
    )


def _default_config_repo(ref: str, path: Path) -> str | None:
    """diffusers' default config repo for this checkpoint's type, read from its header only."""
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_DEFAULT_PIPELINE_PATHS,
        infer_diffusers_model_type,
    )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())  # a safetensors handle, not a dict
            shapes = {
                k: SimpleNamespace(shape=torch.Size(f.get_slice(k).get_shape())) for k in names
            }
    except Exception as e:
        raise _invalid(ref, f"{str(path)!r} is not a readable safetensors file ({e})") from None
    try:
        model_type = infer_diffusers_model_type(shapes)
    except Exception:
        return None
    return DIFFUSERS_DEFAULT_PIPELINE_PATHS.get(model_type, {}).get("pretrained_model_name_or_path")


def _pipeline_class(ref: str, folder: Path) -> type[DiffusionPipeline]:
    """The diffusers pipeline class a folder names; refuses anything that would run its code."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _invalid(ref, f"unreadable model_index.json in {str(folder)!r} ({e})") from None
    name = index.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        raise _invalid(ref, f"{name!r} is not a diffusers pipeline; custom pipelines are not run")
    for component, value in index.items():
        if component.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library = value[0]
        if (
            library is None
            or library in _COMPONENT_LIBRARIES
            or hasattr(diffusers.pipelines, library)
        ):
            continue
        raise _invalid(
            ref, f"component {component!r} comes from {library!r}; remote code is never run"
        )
    return cls


# --------------------------------------------------------------------------- the cache


@dataclass
class _Entry:
    ref: str
    base: DiffusionPipeline
    scheduler: Any  # the model's own scheduler, put back before each job
    nbytes: int
    info: ModelInfo
    pipes: dict[str, DiffusionPipeline] = field(default_factory=dict)


class PipelineCache:
    """Warm pipelines for one device: one load per model, LRU over `max_models`.

    `max_gb` (0: no limit) also evicts the least recently used models while the weights held
    add up to more than that many GB; the newest model always stays. `loads` and
    `load_seconds` (ref → seconds of its latest load) are there for tests and metrics.
    `dtype` is a torch dtype, or a `FARM_DTYPE` setting (`auto`: per family and device);
    `offload` and `vae_tiling` are `FARM_OFFLOAD` and `FARM_VAE_TILING`.
    """

    def __init__(
        self,
        device: str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        max_models: int = 2,
        *,
        models_dir: Path | None = None,
        max_gb: float = 0.0,
        offload: str = "none",
        vae_tiling: bool = False,
    ) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload = offload
        self.vae_tiling = vae_tiling
        self.max_models = max_models
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.max_gb = max_gb
        self.loads = 0
        self.load_seconds: dict[str, float] = {}
        self.prepare: Any = None
        """Called on each freshly loaded pipeline (`workers.models.optimize`: channels_last, compile)."""
        self._entries: OrderedDict[ModelSource, _Entry] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def held(self) -> list[str]:
        """Refs of the models held now, least recently used first."""
        return [entry.ref for entry in self._entries.values()]

    def get(self, ref: str, kind: str) -> DiffusionPipeline:
        """A warm pipeline for `kind` ("txt2img" | "img2img" | "inpaint") over model `ref`."""
        if kind not in KINDS:
            raise InvalidJob(
                f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}", field="kind"
            )
        source = resolve_model(ref, self.models_dir)
        with self._lock:
            entry = self._entries.get(source)
            if entry is None:
                entry = self._load(ref, source)
            self._entries.move_to_end(source)
            entry.info.check_kind(kind, ref)
            pipe = entry.pipes.get(kind)
            if pipe is None:
                pipe = entry.pipes[kind] = self._derive(entry, kind)
            if pipe.scheduler is not entry.scheduler:  # a job's scheduler never outlives it
                pipe.scheduler = entry.scheduler
            return pipe

    def info(self, ref: str) -> ModelInfo:
        """What model `ref` is (`farm.jobs.families.ModelInfo`), read from its loaded pipeline
        (loading it if it is not warm)."""
        source = resolve_model(ref, self.models_dir)
        with self._lock:
            entry = self._entries.get(source) or self._load(ref, source)
            return entry.info

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._free()

    # ----------------------------------------------------------------------- internals

    def _load(self, ref: str, source: ModelSource) -> _Entry:
        start = time.perf_counter()
        dtype = self.dtype
        if isinstance(dtype, str):  # FARM_DTYPE: auto picks by family and device
            dtype = choose_dtype(dtype, self.device, _family(source))
        try:
            base = place(
                _load_pipeline(ref, source, dtype), self.device, self.offload, self.vae_tiling
            )
        except InvalidJob:
            raise
        except torch.cuda.OutOfMemoryError as e:
            self._free()
            raise TransientError(f"out of device memory loading model {ref!r}") from e
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            RuntimeError,
            SingleFileComponentError,
        ) as e:
            raise _invalid(ref, f"could not be loaded: {e}") from e
        base.set_progress_bar_config(disable=True)
        if self.prepare is not None:
            base = self.prepare(base)
        self.loads += 1
        self.load_seconds[ref] = time.perf_counter() - start
        nbytes = sum(
            p.numel() * p.element_size()
            for module in base.components.values()
            if isinstance(module, torch.nn.Module)
            for p in module.parameters()
        )
        entry = _Entry(
            ref=ref, base=base, scheduler=base.scheduler, nbytes=nbytes, info=info_of(base, ref)
        )
        self._entries[source] = entry
        self._evict()
        return entry

    def _derive(self, entry: _Entry, kind: str) -> DiffusionPipeline:
        try:
            return derive(entry.base, entry.info, kind)
        except (ValueError, TypeError) as e:
            raise InvalidJob(
                f"model {entry.ref!r} cannot run {kind} jobs: {e}", field="model"
            ) from e

    def _evict(self) -> None:
        budget = self.max_gb * 1e9
        evicted = False
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_models
            or (budget and sum(e.nbytes for e in self._entries.values()) > budget)
        ):
            self._entries.popitem(last=False)
            evicted = True
        if evicted:
            self._free()

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _family(source: ModelSource) -> str | None:
    """The family of the model at `source`, from its files (or the built-in table), before it
    is loaded: its dtype depends on it."""
    if source.kind == "builtin":
        return BUILTIN_INFO[source.location].family
    info = folder_info(Path(source.config if source.kind == "single_file" else source.location))
    return info.family if info is not None else None


def _load_pipeline(ref: str, source: ModelSource, dtype: torch.dtype) -> DiffusionPipeline:
    if source.kind == "builtin":
        pipe = build_builtin(source.location)  # float32
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    if source.kind == "single_file":
        assert source.config is not None
        cls = _pipeline_class(ref, Path(source.config))
        return cls.from_single_file(
            source.location, config=source.config, dtype=dtype, local_files_only=True
        )
    cls = _pipeline_class(ref, Path(source.location))
    return cls.from_pretrained(
        source.location,
        dtype=dtype,
        use_safetensors=True,
        local_files_only=True,
        trust_remote_code=False,
    )
