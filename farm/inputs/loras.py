"""LoRA adapters named by a render, checked and made readable by a worker at submit.

A render's `loras` name adapters three ways (`farm.jobs.refs.check_adapter_ref` checks the form):

    job:<id>                 the adapter fine-tune <id> of this farm stores (`adapter_key`)
    s3://… or file://…       a `.safetensors` object in the farm's store (outside it only with
                             FARM_ALLOW_FOREIGN_INPUTS), checked to exist
    path/to/x.safetensors    a local file: its safetensors header read (no torch), the file
                             uploaded content-addressed (`inputs/<sha256>.safetensors`) and the
                             ref rewritten to that URI, so every worker reads the same bytes

`job:<id>` of a fine-tune that has not ended yet is a dependency: the render is recorded
`waiting` and queued when the fine-tune succeeds (`farm.state.dependencies`). Everything here runs before
anything is written, and a bad ref is an `InvalidJob` naming it.

    >>> parse_lora_flag("s3://bucket/style.safetensors:0.8")
    {'ref': 's3://bucket/style.safetensors', 'scale': 0.8}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from farm.errors import InvalidJob, JobNotFound
from farm.jobs.specs import LoraRef
from farm.jobs.state import JobState
from farm.keys import adapter_key
from farm.state.tracker import Tracker
from farm.storage import ObjectStore

if TYPE_CHECKING:
    from farm.inputs.resolver import InputResolver

FIELD = "loras"


def parse_lora_flag(text: str) -> dict[str, Any]:
    """`--lora REF[:SCALE]` → `{"ref": REF, "scale": SCALE}` (no scale: the spec's default, 1).

    The scale is split off the last `:` only when what follows reads as a number, so
    `s3://…` URIs and `job:<id>` refs pass whole.
    """
    ref, sep, scale = text.rpartition(":")
    if sep and ref and ref != "job":
        try:
            return {"ref": ref, "scale": float(scale)}
        except ValueError:
            pass
    return {"ref": text}


def prepare_loras(
    loras: Sequence[LoraRef],
    inputs: InputResolver,
    tracker: Tracker | None,
    *,
    dry: bool = False,
) -> tuple[list[LoraRef], list[str]]:
    """(the loras as a worker reads them, the ids of the fine-tunes the render must wait for).

    Local files and store URIs go through the input resolver (`InputResolver.adapter`:
    checked, and local files queued for upload with the other inputs). Without a `tracker`
    (a dry run before the farm is found) `job:<id>` refs are left for the real submit.
    """
    out: list[LoraRef] = []
    waits: list[str] = []
    for lora in loras:
        ref = lora.ref
        if ref.startswith("job:") and tracker is None:
            out.append(lora)
            continue
        if ref.startswith("job:") and tracker is not None:
            job_id = ref.removeprefix("job:")
            if _must_wait(tracker, inputs.store, job_id) and job_id not in waits:
                waits.append(job_id)
        else:
            ref = inputs.adapter(ref, FIELD, dry=dry)
        out.append(lora.model_copy(update={"ref": ref}))
    return out, waits


def _must_wait(tracker: Tracker, store: ObjectStore, job_id: str) -> bool:
    """Whether the render waits for fine-tune `job_id`; `InvalidJob` if it can never run."""
    ref = f"job:{job_id}"
    try:
        rec = tracker.get(job_id)
    except JobNotFound:
        raise InvalidJob(
            f"{FIELD}: {ref}: no such job (never submitted, or its record expired)", field=FIELD
        ) from None
    if rec.kind != "finetune":
        raise InvalidJob(
            f"{FIELD}: {ref} is a {rec.kind} job, not a fine-tune: it has no adapter", field=FIELD
        )
    if rec.state in (JobState.FAILED, JobState.CANCELLED):
        why = f": {rec.error}" if rec.error else ""
        raise InvalidJob(f"{FIELD}: fine-tune {ref} {rec.state.value}{why}", field=FIELD)
    if rec.state == JobState.SUCCEEDED:
        if not store.exists(adapter_key(job_id)):
            raise InvalidJob(
                f"{FIELD}: fine-tune {ref} succeeded but no adapter is stored at "
                f"{store.uri(adapter_key(job_id))!r}",
                field=FIELD,
            )
        return False
    return True
