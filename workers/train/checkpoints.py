"""Fine-tune checkpoints in storage: written every `checkpointing_steps`, resumed on retry.

A checkpoint is a folder `adapters/<job_id>/checkpoints/<step>/` of

    lora.safetensors       the LoRA weights being trained (peft names, `unet.`/`text_encoder.`)
    rng.safetensors        torch's CPU (and CUDA) generator states and the noise generator's
    optimizer.pt           AdamW's state (`torch.save`; read back with `weights_only=True`)
    state.json             the step, the loss log so far, Python's `random` state, the scaler
    complete.json          written last: only a folder that has it is ever resumed

so a worker killed while writing one leaves a folder without `complete.json`, which is
ignored, and the attempt after it resumes from the checkpoint before.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from farm.keys import checkpoint_key, checkpoints_prefix
from farm.storage import ObjectStore

MARKER = "complete.json"
"""Written after every other file of a checkpoint: its presence means the folder is whole."""


@dataclass
class Checkpoint:
    """Everything a training run needs to continue exactly where it stopped."""

    step: int
    losses: list[float]
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    python_random: Any = None
    scaler: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def save(store: ObjectStore, job_id: str, ckpt: Checkpoint) -> str:
    """Write a checkpoint, its marker last; the marker's key."""
    buffer = io.BytesIO()
    torch.save(ckpt.optimizer, buffer)
    state = {
        "step": ckpt.step,
        "losses": ckpt.losses,
        "python_random": _jsonable(ckpt.python_random),
        "scaler": ckpt.scaler,
        **ckpt.extra,
    }
    files = {
        "lora.safetensors": save_tensors({k: v.contiguous() for k, v in ckpt.lora.items()}),
        "rng.safetensors": save_tensors(ckpt.rng),
        "optimizer.pt": buffer.getvalue(),
        "state.json": json.dumps(state).encode(),
    }
    store.put_many({checkpoint_key(job_id, ckpt.step, name): data for name, data in files.items()})
    marker = checkpoint_key(job_id, ckpt.step, MARKER)
    store.put(marker, json.dumps({"step": ckpt.step, "files": sorted(files)}).encode())
    return marker


def latest_step(store: ObjectStore, job_id: str) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    steps = [
        int(key.split("/")[-2])
        for key in store.list(checkpoints_prefix(job_id))
        if key.endswith("/" + MARKER)
    ]
    return max(steps, default=None)


def prune(store: ObjectStore, job_id: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints (diffusers'
    `checkpoints_total_limit`); the steps deleted. Each goes marker first, so a prune cut
    short leaves a folder without a marker, which is never resumed."""
    keys = store.list(checkpoints_prefix(job_id))
    complete = sorted(int(k.split("/")[-2]) for k in keys if k.endswith("/" + MARKER))
    old = complete[:-keep] if keep > 0 else complete
    for step in old:
        store.delete(checkpoint_key(job_id, step, MARKER))
        folder = checkpoint_key(job_id, step, "")
        for key in keys:
            if key.startswith(folder) and not key.endswith("/" + MARKER):
                store.delete(key)
    return old


def load_state(store: ObjectStore, job_id: str, step: int) -> dict[str, Any]:
    """Only `state.json` of the checkpoint at `step`: step, losses, and the extra fields."""
    return json.loads(store.get(checkpoint_key(job_id, step, "state.json")))


def load(store: ObjectStore, job_id: str, step: int) -> Checkpoint:
    """Read the complete checkpoint at `step`."""
    state = load_state(store, job_id, step)
    optimizer = torch.load(
        io.BytesIO(store.get(checkpoint_key(job_id, step, "optimizer.pt"))), weights_only=True
    )
    extra = {
        k: v for k, v in state.items() if k not in ("step", "losses", "python_random", "scaler")
    }
    return Checkpoint(
        step=int(state["step"]),
        losses=[float(x) for x in state["losses"]],
        lora=load_tensors(store.get(checkpoint_key(job_id, step, "lora.safetensors"))),
        optimizer=optimizer,
        rng=load_tensors(store.get(checkpoint_key(job_id, step, "rng.safetensors"))),
        python_random=_python_state(state.get("python_random")),
        scaler=state.get("scaler"),
        extra=extra,
    )


def rng_state(noise: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every generator training draws from, as it is now: torch's CPU (and CUDA) generator,
    the trainer's noise generator, Python's `random`."""
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "noise": noise.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], noise: torch.Generator, device: torch.device) -> None:
    """Put the generators back as `rng_state` found them (Python's only where it was kept)."""
    torch.set_rng_state(state["torch_cpu"])
    noise.set_state(state["noise"])
    if state.get("python") is not None:
        random.setstate(state["python"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _python_state(value: Any) -> Any:
    """`random.getstate()` back from its JSON form (nested lists → tuples)."""
    if value is None:
        return None
    version, internal, gauss = value
    return (version, tuple(internal), gauss)
