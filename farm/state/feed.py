"""Following one job: its state changes from the events stream, its progress and previews.

    farm:events              stream: one entry per state change (`job`, `state`)
    farm:preview:<id>        hash: the job's latest preview (step, total, png base64), TTL

What `GET /v1/jobs/{id}/events` (server-sent events) reads. A client's position is an event
id of the stream, so it resumes with `Last-Event-ID` where it left off: `after` gives the
entries past it. `snapshot` reads the newest event id and the job's record in one MULTI, so
every event after that id happened after the record was read: nothing is told twice or lost.

Previews are written by a worker's heartbeat, fenced by the attempt's token in one script: a
superseded attempt cannot show a preview of a render that is no longer the job's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from farm.keys import RedisKeys
from farm.state.connection import Connection

PREVIEW_TTL = 3600
"""Seconds a preview outlives its last update."""

PUT_PREVIEW = """
-- KEYS: the job, its preview; ARGV: token, step, total, png (base64), ttl
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], 'step', ARGV[2], 'total', ARGV[3], 'png', ARGV[4])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
return 1
"""


class Feed:
    """Events, progress and previews of jobs (`tracker.feed`)."""

    def __init__(self, conn: Connection, keys: RedisKeys) -> None:
        self._conn = conn
        self._keys = keys
        self._put_preview = conn.client.register_script(PUT_PREVIEW)

    def snapshot(self, job_id: str) -> tuple[str, dict[str, str]]:
        """(the newest event id, the job's raw record), read atomically."""
        with self._conn.doing("reading a job and the events stream", job_id):
            pipe = self._conn.client.pipeline(transaction=True)
            pipe.xrevrange(self._keys.events, count=1)
            pipe.hgetall(self._keys.job(job_id))
            last, record = pipe.execute()
        return (last[0][0] if last else "0-0"), record

    def after(
        self, after: str, count: int = 1000, block: float | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """Stream entries after the id `after`, oldest first; with `block`, wait up to that
        many seconds for one when there is none yet."""
        with self._conn.doing("following the events stream"):
            if block is None:
                raw: Any = self._conn.client.xrange(
                    self._keys.events, f"({after}", "+", count=count
                )
                return list(raw)
            res: Any = self._conn.client.xread(
                {self._keys.events: after}, block=max(1, int(block * 1000)), count=count
            )
        return list(res[0][1]) if res else []

    def progress(self, job_id: str) -> tuple[str | None, int, int, int | None]:
        """(state, step, total, the step of its latest preview or None), one round trip."""
        with self._conn.doing("reading a job's progress", job_id):
            pipe = self._conn.client.pipeline(transaction=False)
            pipe.hmget(self._keys.job(job_id), ["state", "step", "total"])
            pipe.hget(self._keys.preview(job_id), "step")
            (state, step, total), pstep = pipe.execute()
        return state, int(step or 0), int(total or 0), int(pstep) if pstep else None

    def preview(self, job_id: str) -> dict[str, Any] | None:
        """The job's latest preview: {step, total, png (base64)}, or None."""
        with self._conn.doing("reading a job's preview", job_id):
            raw: dict[str, str] = self._conn.client.hgetall(self._keys.preview(job_id))  # type: ignore[assignment]
        if not raw:
            return None
        return {"step": int(raw["step"]), "total": int(raw["total"]), "png": raw["png"]}

    def put_previews(self, previews: Sequence[tuple[str, str, int, int, str]]) -> None:
        """(job id, token, step, total, png base64) each, fenced by the token, one round trip."""
        if not previews:
            return
        with self._conn.doing("publishing previews"):
            pipe = self._conn.client.pipeline(transaction=False)
            for job_id, token, step, total, png in previews:
                self._put_preview(
                    keys=[self._keys.job(job_id), self._keys.preview(job_id)],
                    args=[token, step, total, png, PREVIEW_TTL],
                    client=pipe,
                )
            pipe.execute()
