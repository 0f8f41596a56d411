"""The live workers of a farm: each worker writes its entry, `farm workers` and the dashboard
read them.

One Redis hash (`RedisKeys.workers`): worker name → JSON of a `WorkerInfo`. A worker rewrites
its entry every few seconds (and when its job or warm models change) and deletes it when it
stops; an entry whose `heartbeat` is older than `STALE_AFTER` is a worker that died.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel

from farm.keys import RedisKeys

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


def publish(r: Any, keys: RedisKeys, info: WorkerInfo) -> None:
    """Write (or refresh) this worker's entry."""
    r.hset(keys.workers, info.name, info.model_dump_json())


def withdraw(r: Any, keys: RedisKeys, name: str) -> None:
    """Remove this worker's entry (it is stopping)."""
    r.hdel(keys.workers, name)


def read_workers(r: Any, keys: RedisKeys) -> list[WorkerInfo]:
    """Every worker entry, by name; offline ones included (see `WorkerInfo.online`)."""
    out = []
    for raw in r.hgetall(keys.workers).values():
        try:
            out.append(WorkerInfo.model_validate(json.loads(raw)))
        except (ValueError, TypeError):
            continue  # an entry from another version: skip it rather than fail the listing
    return sorted(out, key=lambda w: w.name)
