"""The reconciler: hands back jobs that Celery's at-least-once delivery left behind.

Redis' fetch of a message and its move to "unacked" are not one step (celery#7950), and an
unacked message comes back only after the visibility timeout. So, every few seconds, one
process (workers take turns through a Redis lock held for the pass) looks for, in this order:

1. jobs handed back with a backoff (`Tracker.schedule_retry`) whose time has come: their
   messages are sent now (a worker never sleeps its backoff away);
2. `running` jobs whose lease ran out (their worker died): handed back to `queued` and
   enqueued again;
3. `waiting` jobs whose dependencies have all ended or expired (a crash between a job's end and
   the release of its dependents): queued or failed (`farm.state.dependencies.release`);
4. messages waiting in a model's affinity queue that no online worker consumes any more
   (`farm.queue.routing.stranded`): moved to `render`, and their jobs' records say so;
5. `queued` jobs whose message is really gone: sent longer than `requeue_after` ago, and not
   found when the broker's lists are audited (at most once per `requeue_after`,
   `farm.state.inflight`): sent again, once;
6. a bounded sweep of the live index, going on where the last pass stopped: records that
   ended or vanished leave it, and a live job a client older than the indexes of step 2-5
   wrote joins them.

Every step reads only what it acts on (the running, the waiting, the suspects), never every
job, and works in bounded chunks; every write checks the pass still holds the lock. A backlog
of a million queued jobs costs one audit of their messages per `requeue_after`, and adds none.

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
from farm.state.inflight import MIN_LEASE, UNFENCED, Turn
from farm.state.tracker import Tracker

log = logging.getLogger("farm.reconciler")


@dataclass
class Report:
    handed_back: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    """Queued jobs whose message was gone: sent again."""
    rerouted: list[str] = field(default_factory=list)
    """Queued jobs whose message was moved from a stranded model queue to `render`."""
    forgotten: int = 0
    """Ids in the live index whose records ended or vanished, removed from it."""
    released: list[str] = field(default_factory=list)
    """Waiting jobs queued because what they waited for had succeeded."""
    failed: list[str] = field(default_factory=list)
    """Waiting jobs failed because what they waited for failed, was cancelled or expired."""
    retried: list[str] = field(default_factory=list)
    """Jobs handed back with a backoff whose time had come: their messages were sent."""
    audited: int = 0
    """Broker messages read to tell lost messages from waiting ones (0: no suspects)."""


def reconcile(
    tracker: Tracker,
    celery: Any,
    *,
    requeue_after: float,
    now: float | None = None,
    turn: Turn = UNFENCED,
) -> Report:
    """One pass (see the module docstring); what it did. `turn`: the lock the pass holds
    (`take_turn`); without one the pass is unfenced (a one-off pass, tests)."""
    now = time.time() if now is None else now
    report = Report()
    inflight = tracker.inflight
    consumed = tracker.workers.consumed_queues(now)

    def target(queue: str | None) -> str:
        return RENDER_QUEUE if not queue or stranded(queue, consumed) else queue

    # 1. Retries whose backoff ran out.
    report.retried = _send_due_retries(tracker, celery, now, target)
    # 2. Running jobs on expired leases.
    running = inflight.running()
    resend: list[tuple[str, str, int]] = []
    fields = ("token", "lease_until", "priority", "queue")
    for job_id, (token, lease, prio, queue) in zip(
        running, tracker.job_fields(running, *fields), strict=True
    ):
        if token and float(lease or 0) < now:
            t = tracker.transition(
                job_id,
                JobState.QUEUED,
                token=token,
                fields={"error": "lease expired: worker lost", "enqueued_at": repr(now)},
            )
            if t.ok:
                report.handed_back.append(job_id)
                resend.append((job_id, target(queue), int(prio or 0)))
    if resend:
        enqueue(celery, resend)
    # 3. Waiting jobs whose dependencies ended.
    for ids in inflight.waiting():
        done = deps.release(tracker, celery, ids)
        report.released += done.queued
        report.failed += done.failed
        inflight.renew(turn)
    # 4. Messages stranded in model queues no online worker consumes.
    queues = inflight.queues()
    lost_queues = {q for q in queues if stranded(q, consumed)}
    for queue in sorted(lost_queues):
        report.rerouted += inflight.move_stranded(turn, queue, RENDER_QUEUE)
    # 5. Queued jobs whose message is gone: when some were sent longer ago than
    #    `requeue_after`, and the broker was not audited for as long, audit it.
    cutoff = now - requeue_after
    audited = inflight.audited_at()
    if inflight.overdue(cutoff) and (audited is None or audited <= cutoff):
        report.audited = inflight.audit(turn, queues)
        for send in inflight.lost(turn, cutoff, now, lost_queues):
            enqueue(celery, send)
            report.requeued += [job_id for job_id, _, _ in send]
        inflight.end_audit(turn, now)
    # 6. The live index, a chunk further.
    report.forgotten = inflight.sweep(turn)
    if report.handed_back or report.requeued or report.rerouted:
        log.warning(
            "reconciler: handed back %d job(s) with expired leases, re-sent %d whose message "
            "was gone, moved %d from model queues no online worker consumes",
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
    """A pass, if no other process holds the reconciler's lock; else None. The lock is held
    for the whole pass (renewed as it goes, every write fenced by it) and then for the rest of
    the interval, so passes never overlap and come once per interval across the farm."""
    started = time.monotonic()
    turn = tracker.inflight.take_turn(owner, max(MIN_LEASE, 3 * interval))
    if turn is None:
        return None
    try:
        return reconcile(tracker, celery, requeue_after=requeue_after, turn=turn)
    finally:
        tracker.inflight.end_turn(turn, keep=interval - (time.monotonic() - started))
