"""The reconciler: hands back jobs that Celery's at-least-once delivery left behind.

Redis' fetch of a message and its move to "unacked" are not one step (celery#7950), and an
unacked message comes back only after the visibility timeout. So, every few seconds, one
process (workers take turns through a Redis lock) looks for:

- `running` jobs whose lease ran out (their worker died): handed back to `queued` and
  enqueued again;
- `queued` jobs enqueued longer ago than `requeue_after` without being claimed (a message
  lost between fetch and unacked, or a crash between record and enqueue): enqueued again;
- `waiting` jobs whose dependencies have all ended or expired (a crash between a job's end and
  the release of its dependents): queued or failed (`farm.state.dependencies.release`);
- `queued` jobs waiting in a model's affinity queue that no online worker consumes any more
  (`farm.queue.routing.stranded`): re-sent to `render` at once, and their record's `queue` says so;
- jobs handed back with a backoff (`Tracker.schedule_retry`) whose time has come: their
  messages are sent now (a worker never sleeps its backoff away).

Re-sends go to the job's own queue, or to `render` when that queue is a stranded model queue.

Every worker runs `take_turn` every `FARM_RECONCILE_INTERVAL`; the Redis lock
(`RedisKeys.reconciler_lock`) makes it one pass per interval across the farm.

A duplicate message is harmless: it finds its job claimed or done and is acknowledged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from farm.jobs.state import JobState
from farm.queue.app import enqueue
from farm.queue.routing import RENDER_QUEUE, stranded
from farm.state import dependencies as deps
from farm.state.tracker import Tracker

log = logging.getLogger("farm.reconciler")


@dataclass
class Report:
    handed_back: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    rerouted: list[str] = field(default_factory=list)
    """Queued jobs moved from a stranded model queue to `render`."""
    forgotten: int = 0
    """Ids in the live index whose records expired, removed from it."""
    released: list[str] = field(default_factory=list)
    """Waiting jobs queued because what they waited for had succeeded."""
    failed: list[str] = field(default_factory=list)
    """Waiting jobs failed because what they waited for failed, was cancelled or expired."""
    retried: list[str] = field(default_factory=list)
    """Jobs handed back with a backoff whose time had come: their messages were sent."""


def reconcile(
    tracker: Tracker, celery: Any, *, requeue_after: float, now: float | None = None
) -> Report:
    """One pass over the live jobs; what it handed back and re-enqueued."""
    now = time.time() if now is None else now
    report = Report()
    consumed = tracker.workers.consumed_queues(now)

    def target(queue: str | None) -> str:
        return RENDER_QUEUE if not queue or stranded(queue, consumed) else queue

    report.retried = _send_due_retries(tracker, celery, now, target)
    for ids in tracker.live_ids():
        fields = ("state", "token", "lease_until", "enqueued_at", "created_at", "priority", "queue")
        resend: list[tuple[str, str, int]] = []
        gone: list[str] = []
        waiting: list[str] = []
        touched: dict[str, dict[str, Any]] = {}
        for job_id, (state, token, lease, enqueued, created, prio, queue) in zip(
            ids, tracker.job_fields(ids, *fields), strict=True
        ):
            if state is None or JobState(state).terminal:
                gone.append(job_id)
            elif state == JobState.RUNNING and float(lease or 0) < now:
                t = tracker.transition(
                    job_id,
                    JobState.QUEUED,
                    token=token,
                    fields={"error": "lease expired: worker lost", "enqueued_at": now},
                )
                if t.ok:
                    report.handed_back.append(job_id)
                    resend.append((job_id, target(queue), int(prio or 0)))
            elif (
                state == JobState.QUEUED and float(enqueued or created or now) < now - requeue_after
            ):
                touched[job_id] = {"enqueued_at": repr(now)}
                report.requeued.append(job_id)
                resend.append((job_id, target(queue), int(prio or 0)))
            elif state == JobState.QUEUED and queue and stranded(queue, consumed):
                touched[job_id] = {"queue": RENDER_QUEUE}
                report.rerouted.append(job_id)
                resend.append((job_id, RENDER_QUEUE, int(prio or 0)))
            elif state == JobState.WAITING:
                waiting.append(job_id)
        tracker.set_fields_many(touched)
        if gone:
            tracker.forget(gone)
            report.forgotten += len(gone)
        if resend:
            enqueue(celery, resend)
        if waiting:
            done = deps.release(tracker, celery, waiting)
            report.released += done.queued
            report.failed += done.failed
    if report.handed_back or report.requeued or report.rerouted:
        log.warning(
            "reconciler: handed back %d job(s) with expired leases, re-enqueued %d queued, "
            "moved %d from model queues no online worker consumes",
            len(report.handed_back),
            len(report.requeued),
            len(report.rerouted),
        )
    return report


def _send_due_retries(tracker: Tracker, celery: Any, now: float, target: Any) -> list[str]:
    """Send the messages of handed-back jobs whose backoff has run out (each taken once)."""
    ids = tracker.take_due_retries(now)
    if not ids:
        return []
    send = []
    for job_id, (state, prio, queue) in zip(
        ids, tracker.job_fields(ids, "state", "priority", "queue"), strict=True
    ):
        if state == JobState.QUEUED:
            send.append((job_id, target(queue), int(prio or 0)))
    if send:
        enqueue(celery, send)
    return [job_id for job_id, _, _ in send]


def take_turn(
    tracker: Tracker, celery: Any, owner: str, *, interval: float, requeue_after: float
) -> Report | None:
    """A pass, if no other process has taken this interval's turn (the lock); else None."""
    if not tracker.try_lock(tracker.keys.reconciler_lock, owner, interval):
        return None
    return reconcile(tracker, celery, requeue_after=requeue_after)
