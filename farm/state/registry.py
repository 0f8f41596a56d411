"""The live workers of a farm: each worker writes its entry, `farm workers`, the dashboard,
the router and the reconciler read them.

One Redis hash (`RedisKeys.workers`): worker name → JSON of a `WorkerInfo`. A worker rewrites
its entry every few seconds (and when its job or warm models change) and deletes it when it
stops; an entry whose `heartbeat` is older than `STALE_AFTER` is a worker that died.
"""

from __future__ import annotations

import json
import time

from pydantic import BaseModel

from farm.keys import RedisKeys
from farm.state.connection import Connection

STALE_AFTER = 30.0
"""Seconds without a heartbeat after which a worker's entry counts as offline."""


class WorkerInfo(BaseModel):
    """What one worker process tells the farm about itself."""

    name: str
    host: str
    pid: int
    device: str
    queues: list[str] = []
    models: list[str] = []
    """Model refs whose pipelines it holds warm."""
    job: str | None = None
    """The job it is running now, if any."""
    jobs_done: int = 0
    started_at: float
    heartbeat: float

    def online(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) - self.heartbeat < STALE_AFTER


class WorkerRegistry:
    """The workers' entries in Redis."""

    def __init__(self, conn: Connection, keys: RedisKeys) -> None:
        self._conn = conn
        self._keys = keys

    def publish(self, info: WorkerInfo) -> None:
        """Write (or refresh) this worker's entry."""
        with self._conn.doing("publishing a worker's entry"):
            self._conn.client.hset(self._keys.workers, info.name, info.model_dump_json())

    def withdraw(self, name: str) -> None:
        """Remove this worker's entry (it is stopping)."""
        with self._conn.doing("withdrawing a worker's entry"):
            self._conn.client.hdel(self._keys.workers, name)

    def read(self) -> list[WorkerInfo]:
        """Every worker entry, by name; offline ones included (see `WorkerInfo.online`)."""
        with self._conn.doing("reading the worker registry"):
            raw: dict[str, str] = self._conn.client.hgetall(self._keys.workers)  # type: ignore[assignment]
        out = []
        for value in raw.values():
            try:
                out.append(WorkerInfo.model_validate(json.loads(value)))
            except (ValueError, TypeError):
                continue  # an entry from another version: skip it rather than fail the listing
        return sorted(out, key=lambda w: w.name)

    def consumed_queues(self, now: float | None = None) -> set[str]:
        """The queues some online worker consumes now."""
        now = time.time() if now is None else now
        return {q for w in self.read() if w.online(now) for q in w.queues}
