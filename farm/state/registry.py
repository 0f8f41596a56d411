"""The live workers of a farm: each worker writes its entry, `farm workers`, the dashboard,
the router and the reconciler read them.

One Redis hash (`RedisKeys.workers`): worker name → JSON of a `WorkerInfo`. A worker rewrites
its entry every few seconds (and when its job or warm models change) and deletes it when it
stops; an entry whose `heartbeat` is older than `STALE_AFTER` is a worker that died.

A name belongs to one live worker at a time (`WorkerRegistry.claim`): a second worker that
asks for a name a live one holds (two `farm worker --device cpu` on one host are both
`cpu@host`) serves as `cpu-2@host` instead, as Celery warns of duplicate node names, so both
are listed and neither entry overwrites the other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import redis
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
    ready: bool = True
    """Consuming jobs; False while it starts (loads models, connects its consumer)."""

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

    def claim(self, info: WorkerInfo, alive: Callable[[WorkerInfo], bool]) -> WorkerInfo:
        """Write a starting worker's first entry under its name, or, while a worker that
        `alive` says is alive holds that name, under the first free `<name>-2`, `-3`, ...
        (the `@host` part kept last); the entry written. Atomic against a worker claiming at
        the same moment (WATCH on the registry)."""
        base, at, host = info.name.partition("@")
        with self._conn.doing("claiming a worker name"):
            for _ in range(100):  # the registry changes under us only while others write it
                pipe = self._conn.client.pipeline(transaction=True)
                try:
                    pipe.watch(self._keys.workers)
                    taken: dict[str, str] = pipe.hgetall(self._keys.workers)  # type: ignore[assignment]
                    n, name = 1, info.name
                    while name in taken and _holds(taken[name], info, alive):
                        n += 1
                        name = f"{base}-{n}{at}{host}"
                    entry = info.model_copy(update={"name": name})
                    pipe.multi()
                    pipe.hset(self._keys.workers, name, entry.model_dump_json())
                    pipe.execute()
                    return entry
                except redis.WatchError:
                    continue
                finally:
                    pipe.reset()
        raise RuntimeError("the worker registry kept changing; could not claim a name")

    def withdraw(self, name: str) -> None:
        """Remove this worker's entry (it is stopping)."""
        with self._conn.doing("withdrawing a worker's entry"):
            self._conn.client.hdel(self._keys.workers, name)

    def read(self, *, starting: bool = False) -> list[WorkerInfo]:
        """Every worker entry, by name; offline ones included (see `WorkerInfo.online`), and
        with `starting` those of workers still starting (not `ready`: routing, the
        reconciler and the dashboard count only workers that take jobs)."""
        with self._conn.doing("reading the worker registry"):
            raw: dict[str, str] = self._conn.client.hgetall(self._keys.workers)  # type: ignore[assignment]
        out = []
        for value in raw.values():
            try:
                info = WorkerInfo.model_validate(json.loads(value))
            except (ValueError, TypeError):
                continue  # an entry from another version: skip it rather than fail the listing
            if info.ready or starting:
                out.append(info)
        return sorted(out, key=lambda w: w.name)

    def consumed_queues(self, now: float | None = None) -> set[str]:
        """The queues some online worker consumes now."""
        now = time.time() if now is None else now
        return {q for w in self.read() if w.online(now) for q in w.queues}


def _holds(raw: str, me: WorkerInfo, alive: Callable[[WorkerInfo], bool]) -> bool:
    """Whether the entry `raw` is another worker that is alive (an unreadable one is not)."""
    try:
        other = WorkerInfo.model_validate(json.loads(raw))
    except (ValueError, TypeError):
        return False
    if (other.host, other.pid) == (me.host, me.pid):
        return False
    return alive(other)
