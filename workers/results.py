"""A render's results stored, and its jobs finished from them: first writer wins.

Exactly once against zombies. A worker paused after rendering (SIGSTOP, a GC pause, a VM
stall, a partition holding its PUTs) may wake after its lease ran out and another attempt took
the job over and finished it. Fencing in Redis cannot stop it: whatever it checks before a PUT,
the pause can fall between the check and the PUT landing. So the writes themselves are
conditional: every output, mask and meta.json is stored with `ObjectStore.put_new` (S3
`If-None-Match: *`, `os.link` on a folder), and the first attempt to store a key wins; a
loser drops its bytes. Keys stay deterministic (`jobs/<id>/out/<i>.png`, readers need no
indirection), and what an object holds never changes once written, which is what a reader, a
dataset fetch or a versioned bucket sees.

Attempt-scoped keys promoted by the fenced finish were the other design: they keep a zombie's
bytes apart, but promotion is a copy after the finish (a crash between the two leaves the
record pointing at nothing), or the record points at attempt keys forever (every reader must
follow it). First-writer-wins needs neither, because every attempt of a job renders the same
spec with the same seed: an object stored by any attempt is a valid result. meta.json is
stored last and conditionally too, so it names the attempt whose outputs are stored: an
attempt whose meta.json lost to an earlier one finishes from that one (`finish_stored`), and a
zombie whose meta.json lost to the attempt that took over learns so at its fenced finish,
which refuses it ("superseded"). A retried attempt that finds its own earlier attempt's
objects keeps them, by the same rule. Each object is one attempt's bytes, whole: should two
attempts interleave (one's outputs land first, the other's meta.json), every object is still a
render of the same spec and seed, and none is ever replaced.

    >>> store_and_finish(rt, done, batch_ids, timings, hb, outcomes)   # workers.worker, 6-7
"""

from __future__ import annotations

import json
import logging
from typing import Any

from farm.inputs import images
from farm.jobs.specs import dump_spec
from farm.jobs.state import JobState
from farm.keys import job_prefix, mask_key, meta_key, output_key
from workers.faults import inject
from workers.heartbeat import Heartbeat
from workers.outcomes import Outcome, end, finish_stored
from workers.runtime import Held, Runtime

log = logging.getLogger("farm.worker")


def store_and_finish(
    rt: Runtime,
    done: list[tuple[Held, Any]],
    batch: list[str],
    timings: dict[str, float],
    hb: Heartbeat,
    outcomes: dict[str, Outcome],
) -> None:
    """Store each rendered job's outputs, mask and meta.json (first writer wins, meta.json
    last), then end it, fenced: succeeded, or superseded; into `outcomes`."""
    # 1. Every job's objects. An earlier attempt that died while storing left some: they
    #    stay (first writer wins), and are not even uploaded again.
    objects: dict[str, bytes] = {}
    for job, result in done:
        queued_s = max(0.0, (job.record.started_at or 0) - job.record.created_at)
        own = {"queued_s": round(queued_s, 4), "inputs_s": round(job.inputs_s, 4), **timings}
        objects.update(job_objects(rt, job, result, batch, own))
    for job, _ in done:
        if job.attempt > 1:
            for key in rt.store.list(job_prefix(job.id)):
                objects.pop(key, None)
    # 2. Outputs and masks, then meta.json: its presence means the job's outputs are stored.
    metas = {key: objects.pop(key) for key in [meta_key(job.id) for job, _ in done]}
    first = any(job.attempt == 1 for job, _ in done)
    inject(rt.settings.fault_injection, [job.spec for job, _ in done], "store", first)
    stored = rt.store.put_new_in_turn(objects, metas)  # one fsync round on a folder
    # 3. Each job succeeded, if its own attempt is still the current one; one whose meta.json
    #    another attempt stored first finishes from that one's.
    for job, result in done:
        key = meta_key(job.id)
        ended = None if stored[key] else finish_stored(rt, job, key, stored_fields)
        resolved = rendered_spec(job, result)  # the record keeps the spec as rendered
        outcomes[job.id] = ended or end(
            rt,
            job,
            JobState.SUCCEEDED,
            **({"spec": resolved} if resolved != job.record.spec else {}),
            outputs=[rt.store.uri(output_key(job.id, i)) for i in range(len(result.images))],
            mask=rt.store.uri(mask_key(job.id)) if result.mask_used is not None else "",
            meta=rt.store.uri(key),
            step=result.steps,
            total=result.steps,
        )
        hb.release(job.id)


def stored_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """The record's fields of a render whose outputs an attempt stored (from its meta.json),
    the spec as it rendered with too."""
    fields = {"outputs": meta["outputs"], "mask": meta.get("mask") or ""}
    return fields | ({"spec": meta["spec"]} if isinstance(meta.get("spec"), dict) else {})


def rendered_spec(job: Held, result: Any) -> dict[str, Any]:
    """The job's spec as rendered (resolved against its model), as its record holds a spec."""
    return dump_spec(result.spec) if getattr(result, "spec", None) is not None else job.record.spec


def job_objects(
    rt: Runtime, job: Held, result: Any, batch: list[str], timings: dict[str, float]
) -> dict[str, bytes]:
    """One job's outputs, mask and meta.json, at its own deterministic keys."""
    job_id, spec = job.id, job.spec
    objects = {output_key(job_id, i): images.encode_png(img) for i, img in enumerate(result.images)}
    if result.mask_used is not None:
        objects[mask_key(job_id)] = images.encode_png(result.mask_used)
    meta = {
        "job_id": job_id,
        "kind": spec.kind,
        "spec": rendered_spec(job, result),
        "seed": spec.seed,
        "model": spec.model,
        "height": result.height,
        "width": result.width,
        "steps": result.steps,
        "worker": rt.name,
        "device": str(rt.device),
        "attempt": job.attempt,
        "batch": {"size": len(batch), "jobs": batch},
        "versions": rt.versions,
        "timings": timings,
        "outputs": [rt.store.uri(output_key(job_id, i)) for i in range(len(result.images))],
        "mask": rt.store.uri(mask_key(job_id)) if result.mask_used is not None else None,
    }
    objects[meta_key(job_id)] = json.dumps(meta, indent=2).encode()
    return objects


def check_conditional_writes(rt: Runtime) -> None:
    """Warn when the S3 server ignores `If-None-Match: *` (MinIO before 2024, some others):
    results would then be replaced by a superseded attempt's late writes, not kept."""
    honoured = getattr(rt.store, "conditional_writes_honoured", None)
    if honoured is None:
        return
    try:
        if not honoured():
            log.warning(
                "storage %r ignores If-None-Match: a superseded attempt's late writes could "
                "replace a job's results; upgrade the server",
                rt.store,
            )
    except Exception as e:  # storage away at start: jobs will say so
        log.warning("could not check storage's conditional writes: %s", e)
