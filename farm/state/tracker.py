"""Job records, state changes, leases and progress in Redis.

A job is one hash, `farm:job:<id>`. Its `state` changes only through `Tracker.transition`
(and `Tracker.claim`, a transition to `running`), one Lua script that checks the change against
`farm.jobs.state.TRANSITIONS`, so no two writers can interleave a read and a write.

Fencing: a claim bumps `attempt` and issues a fresh `token`. Every later write by that
worker (progress, heartbeat, the final state) carries the token and is refused with
`StaleAttempt` once the job has moved on (re-queued, taken over, cancelled), so a stale or
duplicate execution can never overwrite a newer one.

Micro-batching: a job's record carries its batch signature (`farm.jobs.signature.batch_signature`), and
`farm:sig:<signature>` indexes the queued jobs that share it. The same scripts that move a job
into or out of `queued` keep that index in the same atomic step, so it lists exactly the queued
jobs; `Tracker.claim_batch` pops up to n of them and claims each by the same rule as `claim`.
The scripts themselves live in `farm.state.scripts`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from farm.errors import FarmError, JobNotFound, StaleAttempt, TransientError
from farm.jobs.record import JobRecord, Progress
from farm.jobs.state import JobState
from farm.keys import RedisKeys
from farm.settings import FarmSettings
from farm.state import scripts

EVENTS_MAXLEN = 100_000
"""Approximate length the events stream is trimmed to."""


@dataclass(frozen=True, slots=True)
class Transition:
    """What `Tracker.transition` did: `ok`, or why not (`stale`, `illegal`, `unexpected`)."""

    status: str
    state: JobState
    token: str
    attempt: int

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def new_job_id(key: str | None = None) -> str:
    """A random id, or for an idempotency key the same id every time (so resubmits collide)."""
    if key is None:
        return uuid.uuid4().hex
    return uuid.uuid5(uuid.NAMESPACE_URL, f"render-farm:{key}").hex


def _redis_errors() -> tuple[type[BaseException], ...]:
    return (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


class Tracker:
    """Job records in Redis. One instance per process; it is thread-safe (redis-py pools)."""

    def __init__(self, client: redis.Redis, prefix: str = "farm:", record_ttl: int = 7 * 86400):
        self.r = client
        self.keys = RedisKeys(prefix)
        self.record_ttl = record_ttl
        self._transition = client.register_script(scripts.TRANSITION)
        self._heartbeat = client.register_script(scripts.HEARTBEAT)
        self._create = client.register_script(scripts.CREATE)
        self._claim_batch = client.register_script(scripts.CLAIM_BATCH)

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str = "farm:",
        record_ttl: int = 7 * 86400,
        ca_file: str | None = None,
    ) -> Tracker:
        """`redis://` or `rediss://` (TLS, the server verified against `ca_file` or the
        system's CAs); a password in the URL."""
        tls = (
            {"ssl_cert_reqs": "required", "ssl_ca_certs": ca_file}
            if url.startswith("rediss://")
            else {}
        )
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            health_check_interval=10,
            socket_keepalive=True,
            retry_on_timeout=True,
            **tls,
        )
        return cls(client, prefix, record_ttl)

    @classmethod
    def from_settings(cls, settings: FarmSettings) -> Tracker:
        ca = str(settings.redis_ca_file) if settings.redis_ca_file else None
        return cls.from_url(settings.redis_url or "", settings.key_prefix, settings.record_ttl, ca)

    # ------------------------------------------------------------------ create / read

    def create(self, records: Sequence[dict[str, Any]]) -> list[bool]:
        """Write new job records (pipelined); True where created, False where the id existed."""
        pipe = self.r.pipeline(transaction=False)
        for rec in records:
            flat: list[Any] = []
            for k, v in rec.items():
                if v is None:
                    continue
                flat += [k, json.dumps(v) if isinstance(v, dict | list) else v]
            keys = [self.keys.job(rec["id"]), self.keys.jobs, self.keys.events]
            if rec.get("signature"):
                keys.append(self.keys.signature(rec["signature"]))
            self._create(keys=keys, args=[rec["created_at"], rec["id"], *flat], client=pipe)
        try:
            return [bool(x) for x in pipe.execute()]
        except _redis_errors() as e:
            raise TransientError(f"Redis unavailable while creating jobs: {e}") from e

    def get(self, job_id: str) -> JobRecord:
        rec = self.get_many([job_id])[0]
        if rec is None:
            raise JobNotFound("no such job (never submitted, or its record expired)", job_id=job_id)
        return rec

    def get_many(self, job_ids: Iterable[str]) -> list[JobRecord | None]:
        ids = list(job_ids)
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        try:
            raw = pipe.execute()
        except _redis_errors() as e:
            raise TransientError(f"Redis unavailable: {e}") from e
        return [_record(job_id, h) if h else None for job_id, h in zip(ids, raw, strict=True)]

    def states(self, job_ids: Sequence[str]) -> list[tuple[str | None, int, int]]:
        """(state, step, total) per job, in one round trip; state None where missing."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), "state", "step", "total")
        out = []
        for state, step, total in pipe.execute():
            out.append((state, int(step or 0), int(total or 0)))
        return out

    def last_event_id(self) -> str:
        last = self.r.xrevrange(self.keys.events, count=1)
        return last[0][0] if last else "0-0"

    def wait_event(self, after: str, timeout: float) -> str:
        """Block until an event after `after` arrives or `timeout` passes; the newest id seen."""
        res = self.r.xread({self.keys.events: after}, block=max(1, int(timeout * 1000)), count=1000)
        if not res:
            return after
        return res[0][1][-1][0]

    # ------------------------------------------------------------------ state changes

    def transition(
        self,
        job_id: str,
        to: JobState,
        *,
        token: str | None = None,
        expect: Iterable[JobState] = (),
        fields: dict[str, Any] | None = None,
        worker: str = "",
        lease: float = 0.0,
    ) -> Transition:
        """Apply one state change atomically, if the table allows it.

        `token` fences the write to the current attempt; `expect` limits the states it may
        start from. Never raises for a refused change: look at `.status`.
        """
        payload = {
            k: json.dumps(v) if isinstance(v, dict | list) else str(v)
            for k, v in (fields or {}).items()
        }
        try:
            status, state, new_token, attempt = self._transition(
                keys=[self.keys.job(job_id), self.keys.events],
                args=[
                    JobState(to).value,
                    token or "",
                    ",".join(JobState(s).value for s in expect),
                    repr(time.time()),
                    self.record_ttl,
                    json.dumps(payload),
                    lease,
                    worker,
                    EVENTS_MAXLEN,
                    uuid.uuid4().hex[:12],
                    job_id,
                    self.keys.signature(""),
                ],
            )
        except _redis_errors() as e:
            raise TransientError(f"Redis unavailable: {e}", job_id=job_id) from e
        if status == "missing":
            raise JobNotFound("no such job", job_id=job_id)
        return Transition(status, JobState(state), new_token, int(attempt))

    def claim(self, job_id: str, worker: str, lease: float) -> Transition:
        """Start an attempt: queued → running (or take over a running job whose lease ran out)."""
        return self.transition(job_id, JobState.RUNNING, worker=worker, lease=lease)

    def claim_batch(
        self, signature: str, worker: str, lease: float, n: int
    ) -> list[tuple[str, Transition]]:
        """Claim up to `n` queued jobs with this batch signature, most urgent first, in one step.

        Each gets its own attempt token and lease, by the same rules as `claim`. Ids in the
        index that are no longer queued (cancelled, claimed by their own message) are dropped.
        """
        if n < 1:
            return []
        try:
            flat = self._claim_batch(
                keys=[self.keys.signature(signature), self.keys.events],
                args=[
                    n,
                    self.keys.job(""),
                    repr(time.time()),
                    self.record_ttl,
                    lease,
                    worker,
                    uuid.uuid4().hex[:12],
                    EVENTS_MAXLEN,
                    self.keys.signature(""),
                ],
            )
        except _redis_errors() as e:
            raise TransientError(f"Redis unavailable while claiming a batch: {e}") from e
        return [
            (flat[i], Transition("ok", JobState.RUNNING, flat[i + 1], int(flat[i + 2])))
            for i in range(0, len(flat), 3)
        ]

    def queued_with(self, signature: str) -> list[str]:
        """Ids of the queued jobs with this batch signature, most urgent first."""
        return self.r.zrange(self.keys.signature(signature), 0, -1)

    def finish(self, job_id: str, token: str, state: JobState, **fields: Any) -> Transition:
        """End an attempt (succeeded, failed, cancelled, or handed back as queued), fenced."""
        t = self.transition(job_id, state, token=token, fields=fields)
        if t.status == "stale":
            raise StaleAttempt(
                f"attempt {token} is no longer current (job is {t.state.value})", job_id=job_id
            )
        if not t.ok:
            raise FarmError(f"cannot go from {t.state.value} to {state.value}", job_id=job_id)
        return t

    def heartbeat(self, job_id: str, token: str, lease: float, step: int, total: int) -> bool:
        """Renew the lease and record progress; True if a cancel was requested."""
        status, value = self._heartbeat(
            keys=[self.keys.job(job_id)],
            args=[token, repr(time.time() + lease), step, total],
        )
        if status != "ok":
            raise StaleAttempt(
                f"attempt {token} is no longer current (job is {value})", job_id=job_id
            )
        return value == "1"

    def heartbeat_many(
        self,
        beats: Sequence[tuple[str, str, int, int] | tuple[str, str, int, int, float | None]],
        lease: float,
    ) -> dict[str, str]:
        """`heartbeat` for several (job id, token, step, total[, loss]) in one round trip.

        Per job: `ok`, `cancel` (a cancel was requested) or `stale` (the attempt is over).
        A fine-tune's beat carries its latest training loss too.
        """
        until = repr(time.time() + lease)
        pipe = self.r.pipeline(transaction=False)
        for job_id, token, step, total, *loss in beats:
            args: list[str | int | float] = [token, until, step, total]
            if loss and loss[0] is not None:
                args.append(repr(float(loss[0])))
            self._heartbeat(keys=[self.keys.job(job_id)], args=args, client=pipe)
        try:
            replies = pipe.execute()
        except _redis_errors() as e:
            raise TransientError(f"Redis unavailable: {e}") from e
        out = {}
        for (job_id, *_), (status, value) in zip(beats, replies, strict=True):
            out[job_id] = "stale" if status != "ok" else "cancel" if value == "1" else "ok"
        return out

    def request_cancel(self, job_id: str) -> JobState:
        """Cancel a queued (or waiting) job at once; ask a running one to stop at its next step."""
        t = self.transition(job_id, JobState.CANCELLED, expect=[JobState.QUEUED, JobState.WAITING])
        if t.ok or t.state != JobState.RUNNING:
            return t.state
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.keys.job(job_id), "cancel", "1")  # seen by the next heartbeat
        pipe.publish(self.keys.cancels, job_id)  # seen at once by a listening worker
        pipe.execute()
        return JobState.RUNNING

    def set_fields(self, job_id: str, **fields: Any) -> None:
        """Write non-state fields (the `error` of a failed delivery, say). Never `state`."""
        assert "state" not in fields and "token" not in fields
        self.r.hset(self.keys.job(job_id), mapping=fields)


def _record(job_id: str, h: dict[str, str]) -> JobRecord:
    def num(name: str) -> float | None:
        return float(h[name]) if h.get(name) else None

    return JobRecord(
        id=job_id,
        kind=h.get("kind", "?"),
        state=JobState(h["state"]),
        spec=json.loads(h.get("spec", "{}")),
        attempt=int(h.get("attempt", 0)),
        worker=h.get("worker") or None,
        created_at=num("created_at") or 0.0,
        started_at=num("started_at"),
        finished_at=num("finished_at"),
        progress=Progress(
            step=int(h.get("step", 0)), total=int(h.get("total", 0)), loss=num("loss")
        ),
        cancel_requested=h.get("cancel") == "1",
        error=h.get("error") or None,
        outputs=json.loads(h.get("outputs", "[]")),
        mask=h.get("mask") or None,
        meta=h.get("meta") or None,
        signature=h.get("signature") or None,
        queue=h.get("queue") or None,
        depends_on=json.loads(h.get("depends_on", "[]")),
    )
