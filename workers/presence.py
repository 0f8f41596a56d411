"""A worker's presence: its registry entry, and the queues it consumes for its warm models.

The entry (`farm.state.registry.WorkerInfo`) is claimed at start (`claim`: a name a live
worker holds is not shared, this one gets `cpu-2@host`), rewritten when a job starts and ends,
and every `interval` seconds from a thread of its own (so a render of minutes, or a long
model preload, still shows the worker alive), and withdrawn on a clean exit. It says `ready`
once the Celery consumer is attached (`farm up` waits for that). `farm workers`, the dashboard, the client's
`farm.queue.routing.Router` and the reconciler read it.

Affinity: after each job the worker compares the models its `PipelineCache` holds with the
queues it consumes, and consumes `render.<model>` for each warm model, ahead of `render`; a
model evicted from the cache has its queue cancelled. Queue changes run in the worker's main
thread (the solo pool runs tasks in the consumer's thread), through Celery's own
`add_task_queue` / `cancel_task_queue`, the calls behind `celery control add_consumer`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any

from farm.queue.routing import RENDER_QUEUE, is_model_queue, model_queue
from farm.state.registry import WorkerInfo

log = logging.getLogger("farm.worker")

PUBLISH_INTERVAL = 2.0
"""Seconds between two refreshes of a worker's entry (well under `registry.STALE_AFTER`)."""


def holder_alive(other: WorkerInfo) -> bool:
    """Whether the worker of a registry entry is alive: a process on this host is asked
    directly (its pid), one elsewhere judged by its heartbeat."""
    if other.host != socket.gethostname():
        return other.online()
    try:
        os.kill(other.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def physical_device(device: Any) -> str:
    """The device as the machine numbers it: `cuda:3` for a child pinned with
    `CUDA_VISIBLE_DEVICES=3` (where torch calls it `cuda:0`), else torch's own name."""
    if getattr(device, "type", None) != "cuda":
        return str(device)
    visible = [p.strip() for p in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    index = device.index or 0
    if index < len(visible) and visible[index].isdigit():
        return f"cuda:{visible[index]}"
    return str(device)


class Presence:
    """Publishes one worker's entry and keeps its model queues in step with its warm models."""

    def __init__(self, rt: Any, base_queues: list[str], interval: float = PUBLISH_INTERVAL) -> None:
        self.rt = rt
        self.base_queues = list(base_queues)
        """The queues asked for on the command line (`render` by default), consumed last."""
        self.interval = interval
        self.consumer: Any = None
        """Celery's consumer, once the worker is built; until then queues are not changed."""
        self.current: list[str] = self.queues()
        """The queues consumed now, in order (written by the main thread only)."""
        self.job: str | None = None
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ queues

    def queues(self) -> list[str]:
        """What this worker should consume, in order: warm models' queues (most recently
        used first), then the base queues."""
        warm = [model_queue(ref) for ref in reversed(self.rt.cache.held)]
        if not any(q == RENDER_QUEUE or is_model_queue(q) for q in self.base_queues):
            warm = []  # a fine-tune-only worker takes no renders
        return list(dict.fromkeys([*warm, *self.base_queues]))

    def sync_queues(self) -> bool:
        """Consume exactly `queues()`, in that order; whether anything changed. Main thread."""
        if self.consumer is None or self.consumer.task_consumer is None:
            return False
        want, have = self.queues(), [q.name for q in self.consumer.task_consumer.queues]
        if want == have:
            return False
        # Keep the longest common head; cancel the rest and add them back in order (kombu
        # polls queues in the order they were consumed).
        keep = 0
        while keep < min(len(want), len(have)) and want[keep] == have[keep]:
            keep += 1
        for queue in have[keep:]:
            self.consumer.cancel_task_queue(queue)
        for queue in want[keep:]:
            self.consumer.add_task_queue(queue)
        self.current = want
        log.info("worker %s now consumes %s", self.rt.name, ",".join(want))
        self.publish()
        return True

    # ------------------------------------------------------------------ registry

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            name=self.rt.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=physical_device(self.rt.device),
            queues=list(self.current),
            models=list(self.rt.cache.held),
            job=self.job,
            jobs_done=self.rt.jobs_done,
            started_at=self.started_at,
            heartbeat=time.time(),
            ready=self.consumer is not None,
        )

    def claim(self) -> str:
        """Take this worker's name in the registry, or the first free variant of it while a
        live worker holds it (`WorkerRegistry.claim`); the name it serves under now."""
        asked = self.rt.name
        entry = self.rt.tracker.workers.claim(self.info(), holder_alive)
        if entry.name != asked:
            log.warning(
                "worker name %s is held by a live worker; this one serves as %s", asked, entry.name
            )
        self.rt.name = entry.name
        return entry.name

    def publish(self) -> None:
        try:
            self.rt.tracker.workers.publish(self.info())
        except Exception as e:  # Redis away: the next beat writes it again
            log.warning("worker entry not published: %s", e)

    @contextmanager
    def running(self, job_id: str) -> Any:
        """Around one task: the entry shows the job while it runs; afterwards the queues follow
        the warm models (a job may have loaded or evicted one)."""
        self.job = job_id
        self.publish()
        try:
            yield
        finally:
            self.job = None
            if not self.sync_queues():
                self.publish()

    def start(self) -> None:
        self.publish()
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.publish()

    def stop(self) -> None:
        """Stop beating and remove the entry (a clean exit: `farm workers` forgets it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.rt.tracker.workers.withdraw(self.rt.name)
        except Exception as e:
            log.warning("worker entry not withdrawn: %s", e)
