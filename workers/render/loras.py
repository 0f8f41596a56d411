"""LoRA adapters on a warm pipeline: loaded for one render call, then unloaded.

The base model stays loaded (`PipelineCache`); only the adapters come and go. The cache
shares one UNet and text encoder across txt2img, img2img and inpaint (`from_pipe`), so an
adapter left behind would leak into every later job: `applied` always leaves the pipeline
exactly the base again, in a `finally`, by deleting the adapters and unloading the LoRA
layers (both: `unload_lora_weights` alone lets memory creep over many cycles, diffusers#8532).

    >>> adapters = AdapterCache(store)
    >>> with adapters.applied(pipe, [LoraRef(ref="job:ab12", scale=0.8)]):
    ...     results = render_batch(pipe, specs)

Adapter bytes come from the farm's store (`job:<id>` at `adapter_key(id)`, or the URI the
client rewrote a local file to); parsed state dicts are kept in a small LRU keyed by their
content hash, so a hot adapter is neither downloaded nor parsed again. Adapters at a `job:`
ref or at a content-addressed key never change once written, so their ref → hash is kept too.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers import DiffusionPipeline

from farm.errors import InvalidJob
from farm.jobs.specs import LoraRef
from farm.keys import adapter_key
from farm.storage import ObjectNotFound, ObjectStore

log = logging.getLogger("farm.worker")

ADAPTER_NAME = "farm_lora_{}"
"""Names the adapters of one call get in the pipeline (`set_adapters`): by position."""

StateDict = dict[str, torch.Tensor]


class AdapterCache:
    """Adapter state dicts by content hash (LRU over `max_adapters`), and `applied`."""

    def __init__(self, store: ObjectStore, max_adapters: int = 8) -> None:
        self.store = store
        self.max_adapters = max_adapters
        self.downloads = 0
        """How many times adapter bytes were read from storage (for tests and metrics)."""
        self._by_hash: OrderedDict[str, StateDict] = OrderedDict()
        self._immutable: dict[str, str] = {}  # ref → content hash, for refs that never change

    def state_dict(self, ref: str) -> StateDict:
        """The adapter at `ref`, parsed; `InvalidJob` naming it if it cannot be read."""
        sha = self._immutable.get(ref)
        if sha is None or sha not in self._by_hash:
            data = self._read(ref)
            sha = hashlib.sha256(data).hexdigest()
            if sha not in self._by_hash:
                self._by_hash[sha] = _parse(ref, data)
            if ref.startswith("job:") or (self.store.key_of(ref) or "").startswith("inputs/"):
                self._immutable[ref] = sha
        self._by_hash.move_to_end(sha)
        while len(self._by_hash) > self.max_adapters:
            evicted, _ = self._by_hash.popitem(last=False)
            self._immutable = {r: h for r, h in self._immutable.items() if h != evicted}
        return self._by_hash[sha]

    @contextmanager
    def applied(self, pipe: DiffusionPipeline, loras: Sequence[LoraRef]) -> Iterator[None]:
        """`pipe` with `loras` loaded at their scales inside the block; the base after it."""
        if not loras:
            yield
            return
        try:
            names = []
            for i, lora in enumerate(loras):
                name = ADAPTER_NAME.format(i)
                _load(pipe, lora.ref, self.state_dict(lora.ref), name)
                names.append(name)
            pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
            yield
        finally:
            unload(pipe)

    def _read(self, ref: str) -> bytes:
        self.downloads += 1
        try:
            if ref.startswith("job:"):
                return self.store.get(adapter_key(ref.removeprefix("job:")))
            return self.store.get_uri(ref, field="loras")
        except ObjectNotFound:
            raise InvalidJob(
                f"loras: lora {ref}: no adapter is stored there", field="loras"
            ) from None


def _parse(ref: str, data: bytes) -> StateDict:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # SafetensorError, a truncated file…
        raise InvalidJob(
            f"loras: lora {ref}: not a readable safetensors file ({e})", field="loras"
        ) from None


def _load(pipe: DiffusionPipeline, ref: str, state_dict: StateDict, name: str) -> None:
    try:
        # A shallow copy: diffusers pops and renames keys; the cached tensors stay as they are.
        pipe.load_lora_weights(dict(state_dict), adapter_name=name)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise InvalidJob(
            f"loras: lora {ref} does not fit this model: {type(e).__name__}: {e}", field="loras"
        ) from None


def adapter_names(pipe: DiffusionPipeline) -> list[str]:
    """Every adapter loaded into any of the pipeline's components."""
    if not any(getattr(m, "peft_config", None) for m in pipe.components.values()):
        return []
    return sorted({n for names in pipe.get_list_adapters().values() for n in names})


def unload(pipe: DiffusionPipeline) -> None:
    """Put the pipeline back to its base weights: delete every adapter, remove the LoRA layers."""
    names = adapter_names(pipe)
    if names:
        pipe.delete_adapters(names)
    pipe.unload_lora_weights()


def peft_layers(pipe: DiffusionPipeline, component: str | None = None) -> int:
    """How many LoRA (peft tuner) layers the pipeline's modules (or one of them) hold: 0 for
    the base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(
        isinstance(m, BaseTunerLayer)
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module) and component in (None, name)
        for m in module.modules()
    )
