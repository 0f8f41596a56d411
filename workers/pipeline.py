"""The pipelined worker: the device never waits on claims, inputs or storage.

While batch N denoises on the render thread, two other threads keep the hand-off off it:

    ahead   `Line.prefetch`, as batch N enters its last step: batch N+1 claimed (`Tracker.claim_batch` on the lead's batch
            signature, each job with its own attempt token and a lease the heartbeat renews
            from the moment it is claimed), its records read and its inputs decoded
    behind  `Writer`: batch N-1's last beat (a cancel or takeover during its last step),
            its PNGs encoded and its objects stored (first writer wins, meta.json last),
            then each job's fenced finish (`workers.results`)

Bounded: at most one batch ahead (the next is claimed only once the previous one's turn
has come) and one behind (the render thread hands over batch N only when N-1 is stored), so
what a worker holds is at most three batches; their bytes are counted (`Line.bytes`, the
peak in `Line.peak_bytes`, published as `farm_worker_pipeline_bytes`).

What stays as it was, batch by batch:
- a dead worker's prefetched jobs are running with leases like any gathered job: the
  reconciler hands them back once the leases run out;
- a prefetched job cancelled before its turn ends cancelled and is never rendered;
  superseded, it ends stale;
- SIGTERM (`rt.stopping`): the batch rendering stops at its next step and is handed back,
  the prefetched batch is handed back at once, unrendered, and the writer finishes the batch
  it holds (its objects are stored and its jobs end, fenced);
- time limits, out-of-memory halves and one-by-one fallbacks (`workers.worker`), per batch.

A chain ends when the signature has no queued job left, the worker stops, or it has run for
half the visibility timeout (the lead's Celery message stays unacknowledged meanwhile, and
other signatures get their turn); the writer is drained before the Celery task returns.

    >>> with Heartbeat(...) as hb, Line(rt, hb, outcomes, signature) as line:
    ...     batch = line.ready(held)
    ...     while batch is not None:
    ...         render(batch, line)   # its last step calls line.prefetch(); then line.writer
    ...         line.prefetch()       # (if the render did not)
    ...         batch = line.take()
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from farm.errors import TransientError
from farm.inputs import images
from farm.inputs.budgets import Budgets
from farm.jobs import masks
from farm.jobs.specs import Img2Img, Inpaint, Style, parse_spec
from farm.keys import meta_key
from workers.heartbeat import Heartbeat
from workers.outcomes import Limits, Outcome, Stop, dead_letter, finish_stored, settle, stopped
from workers.results import store_and_finish, stored_fields
from workers.runtime import Held, Runtime, load_input

log = logging.getLogger("farm.worker")


def read_inputs(rt: Runtime, job: Held) -> None:
    """The job's spec and inputs, measured against the budgets again (`farm.inputs.budgets`):
    a job that passed an older client fails here with the reason, before any step."""
    t = time.perf_counter()
    job.spec = parse_spec(job.record.spec)
    budgets = Budgets.of(rt.settings)
    budgets.check(job.spec)
    if isinstance(job.spec, Img2Img | Inpaint):
        job.image = load_input(rt, job.spec.image, "image").convert("RGB")
        budgets.check_size(job.spec, job.image.size)
    if isinstance(job.spec, Inpaint):
        gen = job.spec.mask_generator()
        if gen is not None:  # a generated mask: drawn here, as the client would have drawn it
            job.mask = masks.generate(gen, job.image.size)
        else:
            job.mask = images.as_mask(load_input(rt, job.spec.mask_image, "mask_image"))
    if isinstance(job.spec, Style):
        job.style_image = load_input(rt, job.spec.ip_adapter_image, "ip_adapter_image")
    job.inputs_s = time.perf_counter() - t


def held_bytes(job: Held) -> int:
    """Bytes of a held job's decoded inputs (RGB image, L mask, a style reference)."""
    total = 0
    for picture in (job.image, job.mask, job.style_image):
        if picture is not None:
            w, h = picture.size
            total += w * h * len(picture.getbands())
    return total


def result_bytes(results: list[tuple[Held, Any]]) -> int:
    """Bytes of rendered pictures waiting to be stored."""
    total = 0
    for _, result in results:
        for picture in [*result.images, result.mask_used]:
            if picture is not None:
                w, h = picture.size
                total += w * h * len(picture.getbands())
    return total


class Writer:
    """One thread that stores rendered batches and finishes their jobs, one batch behind:
    `store` waits for the batch before to be done, so it holds at most one."""

    def __init__(self, rt: Runtime, hb: Heartbeat, outcomes: dict[str, Outcome], line: Line):
        self.rt, self.hb, self.outcomes, self.line = rt, hb, outcomes, line
        self._pool = ThreadPoolExecutor(1, "farm-writer")
        self._last: Future[None] | None = None

    def store(
        self,
        rendered: list[tuple[Held, Any]],
        batch: list[str],
        timings: dict[str, float],
        limits: Limits,
    ) -> None:
        """Hand a rendered batch over (after the one before is stored and finished)."""
        self.wait()
        size = result_bytes(rendered)
        self.line.count(behind=size)
        self._last = self._pool.submit(self._store, rendered, batch, timings, limits, size)

    def wait(self) -> None:
        if self._last is not None:
            self._last.result()
            self._last = None

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()

    def _store(
        self,
        rendered: list[tuple[Held, Any]],
        batch: list[str],
        timings: dict[str, float],
        limits: Limits,
        size: int,
    ) -> None:
        try:
            self.hb.beat()  # a cancel or takeover that came during the last step counts too
            done = self._still_wanted(rendered, limits)
            if done:
                self._store_or_split(done, batch, timings)
        except Exception:  # Redis away: the jobs' leases run out, the reconciler sees to them
            log.exception("writer: storing a batch of %d failed", len(rendered))
        finally:
            self.line.count(behind=-size)

    def _still_wanted(
        self, rendered: list[tuple[Held, Any]], limits: Limits
    ) -> list[tuple[Held, Any]]:
        """The rendered jobs to store; a cancelled or superseded one ends without outputs."""
        done = []
        for job, result in rendered:
            if job.id in self.hb.stale:
                log.warning("job %s: attempt %s superseded while rendering", job.id, job.token)
                self.outcomes[job.id] = Outcome.STALE
            elif job.id in self.hb.cancelled or result.interrupted:
                self.outcomes[job.id] = stopped(
                    self.rt, job, self.hb, Stop.CANCEL, limits, "running"
                )
            else:
                done.append((job, result))
                continue
            self.hb.release(job.id)
        return done

    def _store_or_split(
        self, done: list[tuple[Held, Any]], batch: list[str], timings: dict[str, float]
    ) -> None:
        """Store and finish `done`; should that fail, each job alone, so a job whose objects
        cannot be stored ends by its error (`settle`: storage down hands it back) alone."""
        try:
            store_and_finish(self.rt, done, batch, timings, self.hb, self.outcomes)
            return
        except Exception as e:
            error = e
        pending = [(job, result) for job, result in done if job.id not in self.outcomes]
        if len(pending) > 1:
            log.warning("storing a batch of %d failed (%s); one by one", len(pending), error)
            for item in pending:
                self._store_or_split([item], batch, timings)
            return
        for job, _ in pending:
            self.outcomes[job.id] = settle(self.rt, job, error)
            self.hb.release(job.id)


class Line:
    """One chain of batches of one signature: the batch ahead, the writer behind."""

    def __init__(
        self,
        rt: Runtime,
        hb: Heartbeat,
        outcomes: dict[str, Outcome],
        signature: str | None,
        per_job: int = 1,
    ) -> None:
        self.rt, self.hb, self.outcomes = rt, hb, outcomes
        self.signature = signature
        self.batch_jobs = max(1, rt.settings.max_batch // max(1, per_job))
        """Jobs a batch claimed ahead may hold: `FARM_MAX_BATCH` images' worth."""
        self.held: list[Held] = []
        """Every job this chain held, for its metrics and logs."""
        self.bytes = {"ahead": 0, "behind": 0}
        self.peak_bytes = 0
        self._lock = threading.Lock()
        self.writer = Writer(rt, hb, outcomes, self)
        self._ahead = ThreadPoolExecutor(1, "farm-prefetch")
        self._next: Future[list[Held]] | None = None
        self._started = time.monotonic()

    def __enter__(self) -> Line:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._next is not None:  # left early: what was claimed ahead goes back at once
            self._hand_back(self._wait_next())
        self._ahead.shutdown()
        self.writer.close()
        self.rt.pipeline_bytes = dict(self.bytes)

    def count(self, ahead: int = 0, behind: int = 0) -> None:
        with self._lock:
            self.bytes["ahead"] += ahead
            self.bytes["behind"] += behind
            self.peak_bytes = max(self.peak_bytes, self.bytes["ahead"] + self.bytes["behind"])
            self.rt.pipeline_bytes = dict(self.bytes)

    # ------------------------------------------------------------------ ready

    def ready(self, held: list[Held]) -> list[Held]:
        """Read each held job's spec and inputs: the ones to render. A job with a bad input
        fails alone; a retried job whose earlier attempt stored everything is just finished."""
        self.held += held
        out = []
        for job in held:
            try:
                if job.attempt > 1 and (
                    ended := finish_stored(self.rt, job, meta_key(job.id), stored_fields)
                ):
                    self.outcomes[job.id] = ended
                    self.hb.release(job.id)
                    continue
                read_inputs(self.rt, job)
                out.append(job)
            except Exception as e:
                self.outcomes[job.id] = settle(self.rt, job, e)
                self.hb.release(job.id)
        return out

    # ------------------------------------------------------------------ ahead

    def prefetch(self) -> None:
        """Claim and read the next batch on the prefetch thread, if the chain goes on (see
        the module docstring) and it is not claimed yet. Called as the batch rendering
        enters its last step: early enough to hide the claim and the reads, late enough
        that the jobs are not held from another worker that is free now."""
        elapsed = time.monotonic() - self._started
        if (
            self._next is not None
            or self.signature is None
            or self.rt.stopping
            or elapsed > self.rt.settings.visibility_timeout / 2
        ):
            return
        self._next = self._ahead.submit(self._claim_next, self.signature, self.batch_jobs)

    def _claim_next(self, signature: str, n: int) -> list[Held]:
        rt = self.rt
        try:
            claims = rt.tracker.claim_batch(signature, rt.name, rt.settings.lease_seconds, n)
        except TransientError as e:  # the reconciler sees to whatever was claimed
            log.warning("could not claim the next batch: %s", e)
            return []
        self.hb.hold({rec.id: t.token for rec, t in claims})  # leased from now on
        held = [Held(rec, t.token, t.attempt) for rec, t in claims]
        held = [job for job in held if not dead_letter(rt, job)]
        ready = self.ready(held)
        self.count(ahead=sum(held_bytes(job) for job in ready))
        return ready

    def _wait_next(self) -> list[Held]:
        assert self._next is not None
        try:
            return self._next.result()
        finally:
            self._next = None

    def take(self) -> list[Held] | None:
        """The batch claimed ahead, less the jobs cancelled or superseded while they waited
        (ended here, never rendered); None when the chain ends."""
        if self._next is None:
            return None
        batch = self._wait_next()
        self.count(ahead=-sum(held_bytes(job) for job in batch))
        if not batch:
            return None
        if self.rt.stopping:
            self._hand_back(batch)
            return None
        turn = []
        for job in batch:
            if job.id in self.rt.cancels.ids:  # published while it waited: as a beat would say
                self.hb.cancelled.add(job.id)
            if job.id in self.hb.stale or job.id in self.hb.cancelled:
                self._end_early(job, Stop.CANCEL)
            else:
                turn.append(job)
        return turn

    def _hand_back(self, batch: list[Held]) -> None:
        """Prefetched jobs the worker will not render (it is stopping): handed back at once,
        no backoff, the attempt not counted; cancelled or superseded ones end as such."""
        for job in batch:
            self._end_early(job, Stop.SHUTDOWN)

    def _end_early(self, job: Held, reason: Stop) -> None:
        limits = Limits(self.rt, self.rt.settings.time_limit, "FARM_TIME_LIMIT")
        try:
            self.outcomes[job.id] = stopped(
                self.rt, job, self.hb, reason, limits, "waiting its turn"
            )
        except Exception as e:  # Redis away: its lease runs out, the reconciler hands it back
            log.warning("job %s: could not end it before its turn: %s", job.id, e)
        self.hb.release(job.id)
