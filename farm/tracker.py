"""Job records, state changes, leases and progress in Redis.

A job is one hash, `farm:job:<id>`. Its `state` changes only through `Tracker.transition`
(and `Tracker.claim`, a transition to `running`), one Lua script that checks the change against
`farm.jobs.TRANSITIONS`, so no two writers can interleave a read and a write.

Fencing: a claim bumps `attempt` and issues a fresh `token`. Every later write by that
worker (progress, heartbeat, the final state) carries the token and is refused with
`StaleAttempt` once the job has moved on (re-queued, taken over, cancelled), so a stale or
duplicate execution can never overwrite a newer one.
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
from farm.jobs import TERMINAL, TRANSITIONS, JobRecord, JobState, Progress
from farm.keys import RedisKeys

EVENTS_MAXLEN = 100_000
"""Approximate length the events stream is trimmed to."""


def _lua_table() -> str:
    rows = ", ".join(
        f"{src.value} = {{{', '.join(f'{d.value} = true' for d in sorted(dsts))}}}"
        for src, dsts in TRANSITIONS.items()
    )
    return f"local ALLOWED = {{{rows}}}\nlocal TERMINAL = {{{', '.join(f'{t.value} = true' for t in sorted(TERMINAL))}}}\n"


# One script applies every state change. It returns {status, state, token, attempt}:
# status is ok | missing | stale | illegal | unexpected (state not among the expected ones).
_TRANSITION = (
    _lua_table()
    + """
local key, events = KEYS[1], KEYS[2]
local to, token, expect = ARGV[1], ARGV[2], ARGV[3]
local now, ttl, fields = tonumber(ARGV[4]), tonumber(ARGV[5]), cjson.decode(ARGV[6])
local lease, worker, maxlen = tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])

local cur = redis.call('HGET', key, 'state')
if not cur then return {'missing', '', '', '0'} end
local attempt = redis.call('HGET', key, 'attempt') or '0'
local current_token = redis.call('HGET', key, 'token') or ''

local function event(state)
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'job', ARGV[11], 'state', state)
end

-- A claim (to == running, no token) may take over a running job whose lease ran out:
-- the old attempt is handed back (running -> queued) before the new one starts.
if to == 'running' and token == '' and cur == 'running' then
  local lease_until = tonumber(redis.call('HGET', key, 'lease_until') or '0')
  if lease_until < now then
    redis.call('HSET', key, 'state', 'queued', 'token', '')
    event('queued')
    cur = 'queued'
  end
end

if token ~= '' and token ~= current_token then return {'stale', cur, '', attempt} end
if expect ~= '' and not string.find(',' .. expect .. ',', ',' .. cur .. ',', 1, true) then
  return {'unexpected', cur, '', attempt}
end
if not ALLOWED[cur][to] then return {'illegal', cur, '', attempt} end

local out_token = current_token
redis.call('HSET', key, 'state', to)
if to == 'running' then
  attempt = tostring(redis.call('HINCRBY', key, 'attempt', 1))
  out_token = attempt .. ':' .. ARGV[10]
  redis.call('HSET', key, 'token', out_token, 'worker', worker, 'started_at', ARGV[4],
             'lease_until', tostring(now + lease), 'step', '0', 'total', '0')
elseif to == 'queued' then
  redis.call('HSET', key, 'token', '')
  out_token = ''
end
for k, v in pairs(fields) do redis.call('HSET', key, k, v) end
if TERMINAL[to] then
  redis.call('HSET', key, 'finished_at', ARGV[4])
  redis.call('EXPIRE', key, ttl)
end
event(to)
return {'ok', to, out_token, attempt}
"""
)

# Heartbeat: renew the lease and record progress, if the token is still current.
# Returns {'ok', cancel_flag} or {'stale', state}.
_HEARTBEAT = """
local key = KEYS[1]
local state = redis.call('HGET', key, 'state')
if state ~= 'running' or redis.call('HGET', key, 'token') ~= ARGV[1] then
  return {'stale', state or 'missing'}
end
redis.call('HSET', key, 'lease_until', ARGV[2], 'step', ARGV[3], 'total', ARGV[4])
return {'ok', redis.call('HGET', key, 'cancel') or '0'}
"""

# Create a record unless one with this id exists. Returns 1 if created, else 0.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100000, '*', 'job', ARGV[2], 'state', 'queued')
return 1
"""


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
        self._transition = client.register_script(_TRANSITION)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._create = client.register_script(_CREATE)

    @classmethod
    def from_url(cls, url: str, prefix: str = "farm:", record_ttl: int = 7 * 86400) -> Tracker:
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            health_check_interval=10,
            socket_keepalive=True,
            retry_on_timeout=True,
        )
        return cls(client, prefix, record_ttl)

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
            self._create(
                keys=[self.keys.job(rec["id"]), self.keys.jobs, self.keys.events],
                args=[rec["created_at"], rec["id"], *flat],
                client=pipe,
            )
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

    def request_cancel(self, job_id: str) -> JobState:
        """Cancel a queued job at once; ask a running one to stop at its next step."""
        t = self.transition(job_id, JobState.CANCELLED, expect=[JobState.QUEUED])
        if t.ok or t.state != JobState.RUNNING:
            return t.state
        self.r.hset(self.keys.job(job_id), "cancel", "1")
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
        progress=Progress(step=int(h.get("step", 0)), total=int(h.get("total", 0))),
        cancel_requested=h.get("cancel") == "1",
        error=h.get("error") or None,
        outputs=json.loads(h.get("outputs", "[]")),
        mask=h.get("mask") or None,
        meta=h.get("meta") or None,
    )
