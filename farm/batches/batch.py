"""Batches by name: the index in Redis, and status, wait, retry and cancel over it.

    >>> from farm.batch_submit import submit_batch
    >>> submit_batch(farm, "cats.csv", name="cats", defaults={"model": "tiny-inpaint"})
    >>> batch = Batch(farm, "cats")
    >>> batch.wait(timeout=3600).counts        # {'succeeded': 2000, ...}

A batch is rows × variations of jobs; each (row, variation) is a *slot*. The index
(`RedisKeys.batch*`) holds the batch's metadata, its slot ids in manifest order, and per slot
its current job id and what the fetched dataset needs (row, variation, source, mask, labels).

Retry never changes a terminal state. A failed job stays failed; `retry` gives its slot a new
job, a new attempt of the same spec whose key is the slot's key plus `#retry<generation>`
(so its id is as deterministic as the first one's, and two concurrent retries collide on one
job), and points the slot at it; the old id is kept in the slot's `history`. A job whose
failure says the same spec must fail again (`Failure.retryable`: invalid input, a failed
fine-tune it waited for) is left alone unless `force`.

`failures(limit)` lists the failed slots with their jobs' reasons (what `farm batch status`
shows); it reads the slots for now, and is the one place to switch to an O(failed) read of a
per-batch failed set.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from farm.errors import InvalidJob, JobNotFound, WaitTimeout
from farm.jobs.record import Failure
from farm.jobs.specs import parse_spec

if TYPE_CHECKING:
    from farm.client import Farm

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Batch names (matched whole: `fullmatch`, so no trailing newline slips through `$`)."""

READ_CHUNK = 1000
"""Slots or job records read per pipelined round trip."""

PENDING = ("unsubmitted", "waiting", "queued", "running")
"""Slot states that may still change (unsubmitted: indexed, but its job was never written)."""

ENDED = ("succeeded", "failed", "cancelled")
"""Job states that never change."""

STATES = ("waiting", "queued", "running", *ENDED)

MOVING = ("waiting", "queued", "running")
"""Slot states that change by themselves: a waiting slot is queued when what it waits for
ends. (An unsubmitted slot moves only when the batch is submitted again.)"""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidJob(
            f"name: {name!r} is not a batch name (letters, digits, '.', '_', '-'; up to 128)",
            field="name",
        )
    return name


def slot_key(name: str, slot: str, generation: int = 0) -> str:
    """The idempotency key of a slot's job in one retry generation (0: the first job)."""
    base = f"batch:{name}:{slot}"
    return base if generation == 0 else f"{base}#retry{generation}"


@dataclass(slots=True)
class Slot:
    """One (row, variation) of a batch, as the index holds it."""

    id: str
    job: str | None = None
    """Current job id; None while the slot is indexed but its job not yet written."""
    info: dict[str, Any] = field(default_factory=dict)
    state: str = "unsubmitted"
    """The job's state; `expired` when its record is gone (`FARM_RECORD_TTL` after it ended)."""
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(slots=True)
class SlotFailure:
    """A failed slot: which row and variation, its job, and why the job failed."""

    slot: str
    job: str
    row: int | None
    variation: int | None
    error: str
    failure: Failure | None
    """The kind of failure the worker recorded (None for records older than the field)."""

    @property
    def retryable(self) -> bool:
        return self.failure is None or self.failure.retryable

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "job": self.job,
            "row": self.row,
            "variation": self.variation,
            "error": self.error,
            "failure": self.failure.value if self.failure else None,
        }


def top_reasons(failures: list[SlotFailure], n: int = 5) -> list[tuple[str, int]]:
    """The `n` most common reasons (each error's first line), most common first."""
    lines = Counter((f.error.strip().splitlines() or ["no reason recorded"])[0] for f in failures)
    return lines.most_common(n)


@dataclass
class BatchStatus:
    name: str
    total: int
    counts: dict[str, int]
    images_done: int
    images_total: int
    rate: float | None
    """Images per second so far (first start to last finish), None before the first result."""
    eta: float | None
    """Seconds to go at that rate, None when unknown or nothing is left."""

    @property
    def pending(self) -> int:
        return sum(self.counts.get(s, 0) for s in PENDING)

    @property
    def settled(self) -> bool:
        """Nothing of the batch will change by itself any more: no slot is waiting, queued
        or running. What `Batch.wait` and `farm batch status --watch` wait for."""
        return not any(self.counts.get(s, 0) for s in MOVING)

    @property
    def all_succeeded(self) -> bool:
        return self.counts.get("succeeded", 0) == self.total

    def line(self, width: int = 30) -> str:
        """`[####--    ] 60/100 jobs  failed 20 succeeded 40 queued 40  2.1 img/s  ETA 28s`:
        `#` the succeeded share, `-` the failed, cancelled and expired one (a cancelled batch
        never shows a full bar)."""
        ended = self.total - self.pending
        good = self.counts.get("succeeded", 0)
        hashes = width * good // max(1, self.total)
        dashes = width * (ended - good) // max(1, self.total)
        bar = "#" * hashes + "-" * dashes
        counts = "  ".join(f"{s} {n}" for s, n in sorted(self.counts.items()) if n)
        rate = f"  {self.rate:.2f} img/s" if self.rate else ""
        eta = f"  ETA {_duration(self.eta)}" if self.eta is not None else ""
        jobs = "job" if self.total == 1 else "jobs"
        return f"[{bar:<{width}}] {ended}/{self.total} {jobs}  {counts}{rate}{eta}"


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Batch:
    """A handle on one batch: its id is its name; everything else is read from Redis."""

    __slots__ = ("farm", "index", "name")

    def __new__(cls, farm: Farm, name: str) -> Any:
        if getattr(farm, "remote", False):  # a farm reached over its HTTP API
            from farm.batches.remote import RemoteBatch

            return RemoteBatch(farm, name)
        return super().__new__(cls)

    def __init__(self, farm: Farm, name: str) -> None:
        self.farm = farm
        self.name = check_name(name)
        self.index = farm.tracker.batches

    def __repr__(self) -> str:
        return f"Batch({self.name!r})"

    # ------------------------------------------------------------------ the index

    def meta(self) -> dict[str, Any]:
        """The batch's metadata; `JobNotFound` if no batch has this name."""
        meta = self.index.meta(self.name)
        if meta is None:
            raise JobNotFound(f"no batch named {self.name!r}")
        return meta

    def slots(self, limit: int | None = None, *, states: bool = True) -> list[Slot]:
        """The slots in manifest order (the first `limit`), with their jobs' states."""
        self.meta()
        ids = self.index.order(self.name, limit)
        out: list[Slot] = []
        for start in range(0, len(ids), READ_CHUNK):
            chunk = ids[start : start + READ_CHUNK]
            for slot_id, info in zip(chunk, self.index.slots(self.name, chunk), strict=True):
                out.append(Slot(slot_id, (info or {}).get("job"), info or {}))
        if states:
            self._read_states(out)
        return out

    def _read_states(self, slots: list[Slot]) -> None:
        with_job = [s for s in slots if s.job]
        fields = self.farm.tracker.job_fields(
            [s.job or "" for s in with_job], "state", "started_at", "finished_at"
        )
        for s, (state, started, finished) in zip(with_job, fields, strict=True):
            s.state = state or "expired"
            s.started_at = float(started) if started else None
            s.finished_at = float(finished) if finished else None

    def job_ids(self) -> list[str]:
        """Current job ids, in manifest order (slots not yet written are left out)."""
        return [s.job for s in self.slots(states=False) if s.job]

    # ------------------------------------------------------------------ following

    def status(self) -> BatchStatus:
        """Counts per state, images done, rate and ETA, from the counters the state scripts
        keep (`BatchIndex.counts`): two reads, whatever the batch's size. A slot whose job was
        never written counts as `unsubmitted`; a job whose record expired keeps the state it
        ended in."""
        meta = self.meta()
        c = self.index.counts(self.name)
        total = int(meta.get("jobs", 0))
        images_total = int(meta.get("images", total))
        counts = {s: int(c[s]) for s in STATES if c.get(s)}
        unsubmitted = total - sum(counts.values())
        if unsubmitted > 0:
            counts["unsubmitted"] = unsubmitted
        done = int(c.get("images:succeeded", 0))
        ended = sum(int(c.get(f"images:{s}", 0)) for s in ENDED)
        rate = eta = None
        if done and c.get("started_at") and c.get("finished_at"):
            pending = sum(counts.get(s, 0) for s in PENDING)
            until = c["finished_at"] if not pending else time.time()
            rate = done / max(1e-3, until - c["started_at"])
            left = max(0, images_total - ended) if pending else 0
            eta = left / rate if left else None
        return BatchStatus(self.name, total, counts, done, images_total, rate, eta)

    def wait(
        self,
        timeout: float | None = None,
        *,
        on_status: Callable[[BatchStatus], None] | None = None,
        poll: float = 1.0,
        on_unavailable: Callable[[str | None], None] | None = None,
    ) -> BatchStatus:
        """Block until the batch is settled (no job waiting, queued or running); its final
        status. A Redis that goes away is waited for, as in `Farm.wait`.

        Slots that were never written (a submit that died half-way) do not progress by
        themselves: waiting ends when only they are left (submit again to fill them).
        """
        patience = self.farm.patience(on_unavailable)
        cursor = patience.run(self.farm.tracker.last_event_id)

        def pause(seconds: float) -> None:  # until the next event, or `seconds`
            nonlocal cursor
            cursor = patience.run(self.farm.tracker.wait_event, cursor, seconds)

        return wait_settled(
            self.name, lambda: patience.run(self.status), pause, timeout, poll, on_status
        )

    def failures(self, limit: int | None = None) -> list[SlotFailure]:
        """The failed slots, first failed first (the first `limit`), each with its job's reason
        and kind of failure: O(failed) whatever the batch's size (the batch's failed set,
        kept by the same scripts that change states; each record names its slot)."""
        self.meta()
        ids = self.index.failed(self.name, limit)
        out: list[SlotFailure] = []
        for start in range(0, len(ids), READ_CHUNK):
            records = [r for r in self.farm.tracker.get_many(ids[start : start + READ_CHUNK]) if r]
            slot_ids = [rec.slot or "" for rec in records]
            infos = self.index.slots(self.name, slot_ids)
            for rec, slot_id, info in zip(records, slot_ids, infos, strict=True):
                info = info or {}
                out.append(
                    SlotFailure(
                        slot_id,
                        rec.id,
                        info.get("row"),
                        info.get("variation"),
                        rec.error or "no reason recorded",
                        rec.failure,
                    )
                )
        return out

    # ------------------------------------------------------------------ acting

    def cancel(self) -> int:
        """Cancel every queued job (at once) and running job (within a step); how many."""
        n = 0
        for s in self.slots():
            if s.state in ("waiting", "queued", "running"):
                self.farm.cancel(s.job or "")
                n += 1
        return n

    def retry(self, *, cancelled: bool = False, force: bool = False) -> list[str]:
        """Give each failed slot (and cancelled, if asked) a new job; the new ids.

        The new job is a fresh record of the same spec (same inputs, seed and parameters)
        under the key `slot_key(name, slot, generation + 1)`; the failed record is left as it
        is. A job whose failure cannot be cured by another attempt (`Failure.retryable`) is
        skipped unless `force` (`failures()` lists them). Safe to repeat after a crash: the
        new id is deterministic, so a retry that died between writing the job and the index
        is completed, not doubled.
        """
        from farm.submit import Submission

        wanted = {"failed", "cancelled"} if cancelled else {"failed"}
        todo = [s for s in self.slots() if s.state in wanted and s.job]
        sub = Submission(self.farm)  # one resolver: inputs the retries share are read once
        new_ids: list[str] = []
        for start in range(0, len(todo), READ_CHUNK):
            chunk = todo[start : start + READ_CHUNK]
            records = self.farm.tracker.get_many(s.job or "" for s in chunk)
            fresh, updates = [], {}
            for s, rec in zip(chunk, records, strict=True):
                if rec is None:
                    continue
                if not force and rec.failure is not None and not rec.failure.retryable:
                    continue  # the same spec would fail again
                generation = int(s.info.get("generation", 0)) + 1
                spec = parse_spec({**rec.spec, "key": slot_key(self.name, s.id, generation)})
                fresh.append(sub.prepare(spec))
                info = {**s.info, "job": fresh[-1]["id"], "generation": generation}
                info["history"] = [*s.info.get("history", []), s.job]
                updates[s.id] = info
            # New jobs are written and sent as any submit's (a row chained to an unfinished
            # fine-tune waits for it); one written by a retry that died before sending its
            # message is sent now.
            sub.store_inputs()
            sub.write(fresh, resend_present=True)
            self.index.set_slots(self.name, updates)
            new_ids += [rec["id"] for rec in fresh]
        return new_ids


def list_batches(farm: Farm) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, metadata) of every batch, oldest first."""
    for name in farm.tracker.batches.names():
        meta = farm.tracker.batches.meta(name)
        if meta is not None:
            yield name, meta


def wait_settled(
    name: str,
    status: Callable[[], BatchStatus],
    pause: Callable[[float], None],
    timeout: float | None,
    poll: float,
    on_status: Callable[[BatchStatus], None] | None,
) -> BatchStatus:
    """The wait of `Batch.wait` (over Redis) and `RemoteBatch.wait` (over the API): look at
    `status()` until the batch is settled, `pause(at most poll)` between looks, `WaitTimeout`
    after `timeout`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        now = status()
        if on_status:
            on_status(now)
        if now.settled:
            return now
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise WaitTimeout(
                f"batch {name}: {now.pending} of {now.total} jobs still not done after {timeout}s"
            )
        pause(poll if left is None else min(poll, left))
