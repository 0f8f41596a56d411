"""How a held job ends: succeeded with its objects, failed with a reason, cancelled, handed
back for another attempt, or dead-lettered. Every ending is a fenced state change."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from farm.errors import InvalidJob, StaleAttempt, TransientError
from farm.inputs import images
from farm.jobs.state import JobState
from farm.keys import mask_key, meta_key, output_key
from farm.queue.app import enqueue
from farm.queue.routing import RENDER_QUEUE, is_model_queue
from farm.state import dependencies as deps
from workers.heartbeat import Heartbeat
from workers.runtime import Held, Runtime

log = logging.getLogger("farm.worker")


def dead_letter(rt: Runtime, job: Held) -> bool:
    """Fail a job on an attempt past `max_deliveries`, with its last recorded error."""
    if job.attempt <= rt.settings.max_deliveries:
        return False
    last = job.record.error or "its worker was lost each time"
    end(
        rt,
        job.id,
        job.token,
        JobState.FAILED,
        error=f"dead-lettered after {job.attempt - 1} attempts: {last}",
    )
    return True


def settle(rt: Runtime, job: Held, error: Exception) -> str:
    """End a job whose run raised: bad input fails, trouble a retry may cure is handed back."""
    if isinstance(error, StaleAttempt):
        return "stale"
    if isinstance(error, InvalidJob):
        return end(rt, job.id, job.token, JobState.FAILED, error=str(error))
    if isinstance(error, TransientError):
        return hand_back(rt, job.id, job.token, job.attempt, str(error))
    log.error("job %s failed", job.id, exc_info=error)
    return end(rt, job.id, job.token, JobState.FAILED, error=f"{type(error).__name__}: {error}")


def stopped(
    rt: Runtime, jobs: list[Held], hb: Heartbeat, outcomes: dict[str, str], reason: str
) -> None:
    """End jobs whose render was stopped: handed back on shutdown, failed past the limit."""
    for job in jobs:
        if job.id in hb.stale:
            outcomes[job.id] = "stale"
        elif job.id in hb.cancelled:
            outcomes[job.id] = end(
                rt, job.id, job.token, JobState.CANCELLED, error="cancelled while running"
            )
        elif reason == "shutdown":
            outcomes[job.id] = hand_back(
                rt, job.id, job.token, 0, "worker shut down", backoff=False
            )
        else:
            outcomes[job.id] = end(
                rt,
                job.id,
                job.token,
                JobState.FAILED,
                error=f"time limit exceeded: {rt.settings.time_limit:g} s (FARM_TIME_LIMIT)",
            )
        hb.release(job.id)


def finish_stored(rt: Runtime, job: Held) -> str | None:
    """Finish a job from what an earlier attempt stored (meta.json is written last), so a
    job whose worker died between storing and marking it done is not rendered again."""
    try:
        meta = json.loads(rt.store.get(meta_key(job.id)))
    except KeyError:  # ObjectNotFound: nothing stored yet
        return None
    log.info("job %s: outputs stored by attempt %s; finishing it", job.id, meta.get("attempt"))
    return end(
        rt,
        job.id,
        job.token,
        JobState.SUCCEEDED,
        outputs=meta["outputs"],
        mask=meta.get("mask") or "",
        meta=rt.store.uri(meta_key(job.id)),
    )


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
        "spec": job.record.spec,
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


def end(rt: Runtime, job_id: str, token: str, state: JobState, **fields: Any) -> str:
    try:
        rt.tracker.finish(job_id, token, state, **fields)
    except StaleAttempt:
        log.warning(
            "job %s: attempt %s superseded; its %s is not recorded", job_id, token, state.value
        )
        return "stale"
    if state.terminal:
        release_dependents(rt, job_id)
    return state.value


def release_dependents(rt: Runtime, job_id: str) -> None:
    """Queue or fail the jobs waiting for this one (`farm.state.dependencies`). Never fails the job that
    ended: whatever is left undone here, the reconciler's next pass does."""
    try:
        deps.job_ended(rt.tracker, rt.celery, job_id)
    except Exception as e:
        log.warning("job %s: its waiting jobs are left to the reconciler: %s", job_id, e)


def hand_back(
    rt: Runtime, job_id: str, token: str, attempt: int, reason: str, backoff: bool = True
) -> str:
    """A transient failure: re-queue the job for another attempt, or fail it after too many."""
    if attempt >= rt.settings.max_deliveries:
        return end(
            rt, job_id, token, JobState.FAILED, error=f"gave up after {attempt} attempts: {reason}"
        )
    if backoff:  # the cause (storage down, say) is likely shared by every job
        time.sleep(min(30.0, 0.5 * 2**attempt))
    outcome = end(rt, job_id, token, JobState.QUEUED, error=reason)
    if outcome == JobState.QUEUED.value:
        record = rt.tracker.get(job_id)
        queue = record.queue or RENDER_QUEUE
        if rt.stopping and is_model_queue(queue):  # this worker may be its model's last
            queue = RENDER_QUEUE
        enqueue(rt.celery, [(job_id, queue, int(record.spec.get("priority", 0)))])
    return outcome
