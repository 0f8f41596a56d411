"""Leases and progress of the jobs a worker holds, renewed from one background thread.

The denoising loop only touches memory (the progress of the jobs in the call, the sets of
cancelled and superseded jobs); the thread does the Redis round trips, one pipelined call for
every job held, so per-step overhead is nil and a cancel lands within one beat.

    >>> with Heartbeat(tracker, {job_id: token}, lease=30) as hb:
    ...     render_batch(pipe, specs, on_step=hb.watch([job_id]))
    ...     hb.beat()                    # a last look: a cancel that came during the last step
    ...     hb.release(job_id)           # ended: no more beats for it
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Iterable

from farm.state.tracker import Tracker

log = logging.getLogger("farm.worker")


class Heartbeat:
    """Renews the leases of held jobs and publishes their progress, from one thread."""

    def __init__(
        self,
        tracker: Tracker,
        tokens: dict[str, str],
        lease: float,
        interval: float = 0.2,
        cancels: CancelListener | None = None,
    ) -> None:
        self.tracker = tracker
        self.cancels = cancels or CancelListener(tracker)
        """Cancels published just now: a render stops at its next step, not the next beat."""
        self.lease = lease
        self.interval = interval
        self.tokens = dict(tokens)
        """Job id → attempt token, for the jobs still held."""
        self.progress: dict[str, tuple[int, int]] = {job_id: (0, 0) for job_id in tokens}
        self.loss: dict[str, float] = {}
        """A fine-tune's latest training loss, published with its progress."""
        self.previews: dict[str, tuple[int, int, str]] = {}
        """A render's latest preview (step, total, PNG as base64), until the next beat sends it."""
        self.cancelled: set[str] = set()
        """Jobs whose cancel was requested while held."""
        self.stale: set[str] = set()
        """Jobs whose attempt is no longer current (re-queued, taken over)."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def beat(self) -> None:
        """Renew every held job's lease and record its progress, in one round trip."""
        with self._lock:
            beats = [(j, t, *self.progress[j], self.loss.get(j)) for j, t in self.tokens.items()]
            previews = [
                (j, self.tokens[j], *p) for j, p in self.previews.items() if j in self.tokens
            ]
            self.previews.clear()
        if not beats:
            return
        try:
            replies = self.tracker.heartbeat_many(beats, self.lease)
            self.tracker.feed.put_previews(previews)  # fenced by each attempt's token
        except Exception as e:  # Redis blip: the lease covers several missed beats
            log.warning("heartbeat for %d job(s) failed: %s", len(beats), e)
            return
        with self._lock:
            self.cancelled.update(j for j, r in replies.items() if r == "cancel")
            self.stale.update(j for j, r in replies.items() if r == "stale")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def watch(self, job_ids: Iterable[str]) -> Callable[[int, int], bool]:
        """The step callback of a call that renders `job_ids`: record their progress; True
        (stop the pipeline) once none of them is still wanted."""
        ids = list(job_ids)

        def on_step(step: int, total: int) -> bool:
            with self._lock:
                for job_id in ids:
                    self.progress[job_id] = (step, total)
                self.cancelled.update(j for j in ids if j in self.cancels.ids)
                return all(j in self.cancelled or j in self.stale for j in ids)

        return on_step

    def preview(self, job_id: str, step: int, total: int, png: bytes) -> None:
        """A render's preview after `step`, sent with the next beat (only the latest is kept)."""
        with self._lock:
            self.previews[job_id] = (step, total, base64.b64encode(png).decode())

    def report_loss(self, job_id: str, loss: float) -> None:
        """A fine-tune's loss after its latest step, sent with the next beat."""
        with self._lock:
            self.loss[job_id] = loss

    def hold(self, tokens: dict[str, str]) -> None:
        """Jobs claimed since the heartbeat started (the batch a pipelined worker claims
        ahead): their leases are renewed from now on."""
        with self._lock:
            self.tokens.update(tokens)
            self.progress.update({job_id: (0, 0) for job_id in tokens})

    def release(self, job_id: str) -> None:
        """The job ended (or was handed back): stop renewing its lease."""
        with self._lock:
            self.tokens.pop(job_id, None)
        self.cancels.ids.discard(job_id)


class CancelListener(threading.Thread):
    """Follows the cancel channel for the worker process: the ids whose cancel was published
    while this worker ran. Started once per process; until started it hears nothing, and the
    heartbeat's flag still lands within a beat."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(name="cancels", daemon=True)
        self.tracker = tracker
        self.ids: set[str] = set()
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Listen no more: the thread ends when the channel next breaks, without a word (a
        process that outlives its Redis, a test's, would otherwise say so once a second)."""
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                for job_id in self.tracker.cancel_messages():
                    self.ids.add(job_id)
            except Exception as e:  # Redis away: listen again once it is back
                if self.stopping.is_set():
                    return
                log.warning("cancel listener: %s; reconnecting", e)
                time.sleep(1.0)
