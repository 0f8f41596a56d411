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
  (`farm.queue.routing.stranded`): re-sent to `render` at once, and their record's `queue` says so.

Re-sends go to the job's own queue, or to `render` when that queue is a stranded model queue.

A duplicate message is harmless: it finds its job claimed or done and is acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from farm.jobs.state import JobState
from farm.queue.app import enqueue
from farm.queue.routing import RENDER_QUEUE, consumed_queues, stranded
from farm.state import dependencies as deps
from farm.state.tracker import Tracker

log = logging.getLogger("farm.reconciler")

SCAN_CHUNK = 1000
"""Job records read per pipelined round trip."""


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


def _live_ids(tracker: Tracker) -> Iterator[list[str]]:
    start = 0
    while True:
        ids = tracker.r.zrange(tracker.keys.jobs, start, start + SCAN_CHUNK - 1)
        if not ids:
            return
        yield ids
        start += SCAN_CHUNK


def reconcile(
    tracker: Tracker, celery: Any, *, requeue_after: float, now: float | None = None
) -> Report:
    """One pass over the live jobs; what it handed back and re-enqueued."""
    now = time.time() if now is None else now
    report = Report()
    consumed = consumed_queues(tracker.r, tracker.keys, now)

    def target(queue: str | None) -> str:
        return RENDER_QUEUE if not queue or stranded(queue, consumed) else queue

    for ids in _live_ids(tracker):
        pipe = tracker.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(
                tracker.keys.job(job_id),
                "state",
                "token",
                "lease_until",
                "enqueued_at",
                "created_at",
                "priority",
                "queue",
            )
        resend: list[tuple[str, str, int]] = []
        gone: list[str] = []
        waiting: list[str] = []
        for job_id, (state, token, lease, enqueued, created, prio, queue) in zip(
            ids, pipe.execute(), strict=True
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
                tracker.r.hset(tracker.keys.job(job_id), "enqueued_at", repr(now))
                report.requeued.append(job_id)
                resend.append((job_id, target(queue), int(prio or 0)))
            elif state == JobState.QUEUED and queue and stranded(queue, consumed):
                tracker.r.hset(tracker.keys.job(job_id), "queue", RENDER_QUEUE)
                report.rerouted.append(job_id)
                resend.append((job_id, RENDER_QUEUE, int(prio or 0)))
            elif state == JobState.WAITING:
                waiting.append(job_id)
        if gone:
            tracker.r.zrem(tracker.keys.jobs, *gone)
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
