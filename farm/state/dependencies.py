"""Jobs that wait for other jobs: a render naming `job:<id>` of an unfinished fine-tune.

Such a render is recorded `waiting` with `depends_on` (its record is not in the batch
signature index and no message is sent, so no worker can claim it), and its id goes into the
set of each job it waits for (`RedisKeys.dependents`). When a job ends, `job_ended` releases
its dependents (`release`):

- every job it depends on succeeded: `waiting → queued` (the same script indexes it by its
  batch signature) and its message is sent to its queue;
- one of them failed, was cancelled or is gone: `waiting → failed`, with
  `lora job:<id> failed: <its error>`;
- otherwise it keeps waiting.

No lock is needed. The submitter adds the render to the sets before writing its record and
looks at the jobs it depends on again after (`register`, then `release`); a job that ends
changes its state before reading its set. So whichever runs second sees the other's write, and
`release` is one guarded transition (`expect=waiting`): of the submitter, the ending job's
worker and the reconciler, the first releases the render and only it sends the message.

The reconciler (`farm.state.reconciler`) calls `release` on every waiting job too: the safety net
for a worker that died between ending a job and releasing its dependents.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from farm.jobs.record import Failure, JobRecord
from farm.jobs.state import JobState
from farm.queue.routing import RENDER_QUEUE
from farm.state.tracker import Tracker

log = logging.getLogger("farm.deps")


@dataclass
class Released:
    """What `release` did: jobs queued (and enqueued), jobs failed."""

    queued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def register(tracker: Tracker, records: Sequence[dict[str, Any]]) -> None:
    """Add each waiting record to the dependents of the jobs it waits for (before creating it)."""
    tracker.add_dependents(records)


def job_ended(tracker: Tracker, celery: Any, job_id: str) -> Released:
    """Release the jobs waiting for `job_id`, which has just ended."""
    ids = tracker.dependents(job_id)
    if not ids:
        return Released()
    done = release(tracker, celery, ids)
    tracker.forget_dependents(job_id, ids)
    return done


def release(tracker: Tracker, celery: Any, job_ids: Iterable[str]) -> Released:
    """Queue (and enqueue) or fail each waiting job whose dependencies have all ended."""
    out = Released()
    records = [rec for rec in tracker.get_many(list(job_ids)) if rec is not None]
    send: list[tuple[str, str, int]] = []
    for rec in records:
        if rec.state != JobState.WAITING:
            continue
        verdict = _verdict(tracker, rec)
        if verdict is None:
            continue
        if verdict == "":
            t = tracker.transition(
                rec.id,
                JobState.QUEUED,
                expect=[JobState.WAITING],
                fields={"enqueued_at": repr(time.time())},
            )
            if t.ok:
                out.queued.append(rec.id)
                send.append((rec.id, rec.queue or RENDER_QUEUE, int(rec.spec.get("priority", 0))))
        else:
            t = tracker.transition(
                rec.id,
                JobState.FAILED,
                expect=[JobState.WAITING],
                fields={"error": verdict, "failure": Failure.DEPENDENCY.value},
            )
            if t.ok:
                out.failed.append(rec.id)
    if send:
        from farm.queue.app import enqueue

        enqueue(celery, send)
    if out.queued or out.failed:
        log.info("released %d waiting job(s), failed %d", len(out.queued), len(out.failed))
    return out


def _verdict(tracker: Tracker, rec: JobRecord) -> str | None:
    """ "" when every dependency succeeded, the reason when one never will, None: not yet."""
    parents = tracker.get_many(rec.depends_on)
    pending = False
    for parent_id, parent in zip(rec.depends_on, parents, strict=True):
        if parent is None:
            return f"lora job:{parent_id} is gone (its record expired)"
        if parent.state == JobState.FAILED:
            return f"lora job:{parent_id} failed: {parent.error or 'no reason recorded'}"
        if parent.state == JobState.CANCELLED:
            return f"lora job:{parent_id} was cancelled"
        pending = pending or parent.state != JobState.SUCCEEDED
    return None if pending else ""
