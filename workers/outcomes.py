"""How a held job ends, decided in one place: succeeded with its objects, failed with a
reason, cancelled, handed back for another attempt, or dead-lettered. Every ending is a fenced
state change, and every path (render, fine-tune) reports it as an `Outcome`.

    >>> limits = Limits(rt, rt.settings.time_limit, "FARM_TIME_LIMIT")
    >>> ...                                   # between steps: `limits.reason()`
    >>> outcome = stopped(rt, job, hb, limits.reason(), limits)   # stopped early
    >>> outcome = settle(rt, job, error)                          # it raised
    >>> outcome = end(rt, job, JobState.SUCCEEDED, outputs=...)   # it finished

Errors decide by their type (`farm.errors`): `InvalidJob` fails the job (never retried), a
`TransientError` hands it back for another attempt with a backoff, `StaleAttempt` means
another attempt owns the job now, anything else fails it with its type and message. Every
failure records its kind (`farm.jobs.record.Failure`: invalid, transient, lost, time limit,
error) beside the reason, so `farm batch retry` can skip the jobs that would fail again.

A hand-back with a backoff never sleeps on the worker: the job is queued again with its
message scheduled (`Tracker.schedule_retry`), and the reconciler sends it once the backoff
has run out, so the device goes straight on to the next job.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from farm.errors import InvalidJob, StaleAttempt, TransientError
from farm.jobs.record import Failure
from farm.jobs.state import JobState
from farm.queue.app import enqueue
from farm.queue.routing import RENDER_QUEUE, is_model_queue
from farm.state import dependencies
from workers.heartbeat import Heartbeat
from workers.runtime import Held, Runtime

log = logging.getLogger("farm.worker")

MAX_BACKOFF = 30.0
"""The longest wait before a handed-back job's next attempt."""


class Outcome(StrEnum):
    """How one attempt at a job ended (the `state` label of `farm_jobs_total`)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    HANDED_BACK = "queued"
    """Queued again for another attempt (a transient failure, a shutdown)."""
    SKIPPED = "skipped"
    """A duplicate or stale message: the job was claimed or done already, nothing ran."""
    STALE = "stale"
    """Superseded: another attempt owns the job now, and this one recorded nothing."""


class Stop(StrEnum):
    """Why a running job stopped between two steps."""

    SHUTDOWN = "shutdown"
    TIME_LIMIT = "time limit"
    CANCEL = "cancel"


class Limits:
    """What every render step and training step checks: the worker shutting down, and the
    job's time limit (`FARM_TIME_LIMIT` for renders, `FARM_FINETUNE_TIME_LIMIT` for
    fine-tunes). A cancel comes through the heartbeat."""

    def __init__(self, rt: Runtime, seconds: float, setting: str) -> None:
        self.rt = rt
        self.seconds = seconds
        self.setting = setting
        self.deadline = time.monotonic() + seconds

    def reason(self) -> Stop | None:
        if self.rt.stopping:
            return Stop.SHUTDOWN
        if time.monotonic() > self.deadline:
            return Stop.TIME_LIMIT
        return None


def end(rt: Runtime, job: Held, state: JobState, **fields: Any) -> Outcome:
    """The fenced state change that ends (or hands back) an attempt; its dependents released
    when it ended for good."""
    try:
        rt.tracker.finish(job.id, job.token, state, **fields)
    except StaleAttempt:
        log.warning(
            "job %s: attempt %s superseded; its %s is not recorded", job.id, job.token, state.value
        )
        return Outcome.STALE
    if state.terminal:
        release_dependents(rt, job.id)
    return Outcome(state.value)


def settle(rt: Runtime, job: Held, error: BaseException) -> Outcome:
    """End a job whose run raised, by the error's type (see the module docstring)."""
    if isinstance(error, StaleAttempt):
        return Outcome.STALE
    if isinstance(error, InvalidJob):
        return fail(rt, job, Failure.INVALID, str(error))
    if isinstance(error, TransientError):
        return hand_back(rt, job, str(error))
    log.error("job %s failed", job.id, exc_info=error)
    return fail(rt, job, Failure.ERROR, f"{type(error).__name__}: {error}")


def fail(rt: Runtime, job: Held, failure: Failure, error: str) -> Outcome:
    """End an attempt as failed, with the reason and its kind (`Failure`)."""
    return end(rt, job, JobState.FAILED, error=error, failure=failure.value)


def stopped(
    rt: Runtime, job: Held, hb: Heartbeat, reason: Stop | None, limits: Limits, doing: str
) -> Outcome:
    """End a job stopped between steps: superseded, cancelled, handed back on shutdown (no
    backoff: the next worker may start at once), or failed past its time limit."""
    if job.id in hb.stale:
        return Outcome.STALE
    if job.id in hb.cancelled or reason in (Stop.CANCEL, None):
        return end(rt, job, JobState.CANCELLED, error=f"cancelled while {doing}")
    if reason == Stop.SHUTDOWN:
        return hand_back(rt, job, "worker shut down", backoff=False, counted=False)
    return fail(
        rt, job, Failure.TIME_LIMIT, f"time limit exceeded: {limits.seconds:g} s ({limits.setting})"
    )


def dead_letter(rt: Runtime, job: Held, attempts: int | None = None) -> bool:
    """Fail a job on an attempt past `max_deliveries` (it kills its worker every time), with
    its last recorded error. `attempts`: the attempts that count (a fine-tune's own count)."""
    counted = job.attempt if attempts is None else attempts
    if counted <= rt.settings.max_deliveries:
        return False
    last = job.record.error or "its worker was lost each time"
    fail(rt, job, Failure.LOST, f"dead-lettered after {counted - 1} attempts: {last}")
    return True


def hand_back(
    rt: Runtime, job: Held, reason: str, *, backoff: bool = True, counted: bool = True
) -> Outcome:
    """Queue the job for another attempt (or fail it after `max_deliveries` counted ones).

    With `backoff` (the cause, storage down say, is likely shared by every job) its message
    is scheduled 0.5 s × 2^attempt from now, up to `MAX_BACKOFF`, and sent by the reconciler;
    without, it is sent now. A job handed back by a worker that is stopping goes to `render`,
    not to a model queue this worker may have been the last to consume.
    """
    if counted and job.attempt >= rt.settings.max_deliveries:
        return fail(rt, job, Failure.TRANSIENT, f"gave up after {job.attempt} attempts: {reason}")
    due = time.time() + (min(MAX_BACKOFF, 0.5 * 2**job.attempt) if backoff else 0.0)
    outcome = end(rt, job, JobState.QUEUED, error=reason, enqueued_at=repr(due))
    if outcome != Outcome.HANDED_BACK:
        return outcome
    try:
        if backoff:
            rt.tracker.schedule_retry(job.id, due)
        else:
            queue = job.record.queue or RENDER_QUEUE
            if rt.stopping and is_model_queue(queue):
                queue = RENDER_QUEUE
            enqueue(rt.celery, [(job.id, queue, int(job.record.spec.get("priority", 0)))])
    except Exception as e:  # queued with no message: the reconciler re-sends it
        log.warning("job %s: handed back, its message is left to the reconciler: %s", job.id, e)
    return outcome


def finish_stored(
    rt: Runtime, job: Held, meta_key: str, fields: Callable[[dict[str, Any]], dict[str, Any]]
) -> Outcome | None:
    """Finish a job from what an earlier attempt stored (its meta.json is written last), so a
    job whose worker died between storing and marking it done is not run again. `fields`
    turns that meta.json into the record's fields."""
    try:
        meta = json.loads(rt.store.get(meta_key))
    except KeyError:  # ObjectNotFound: nothing stored yet
        return None
    log.info("job %s: outputs stored by attempt %s; finishing it", job.id, meta.get("attempt"))
    return end(rt, job, JobState.SUCCEEDED, meta=rt.store.uri(meta_key), **fields(meta))


def release_dependents(rt: Runtime, job_id: str) -> None:
    """Queue or fail the jobs waiting for this one (`farm.state.dependencies`). Never fails the
    job that ended: whatever is left undone here, the reconciler's next pass does."""
    try:
        dependencies.job_ended(rt.tracker, rt.celery, job_id)
    except Exception as e:
        log.warning("job %s: its waiting jobs are left to the reconciler: %s", job_id, e)
