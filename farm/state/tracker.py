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
jobs; `Tracker.claim_batch` pops up to n of them and claims each by the same rule as `claim`,
and `Tracker.claim_and_gather` claims a message's job and its batch in one step, records read.
The scripts themselves live in `farm.state.scripts`.

The tracker owns the farm's Redis: nothing outside the state wing touches a Redis client.
Each method runs its calls inside `Connection.doing(what)`, so any Redis error reaches the
caller as a `TransientError` (or `FarmError`) that names what was being done. Its parts:
`tracker.batches` (the batch index, `farm.state.batch_index`), `tracker.workers` (the
worker registry, `farm.state.registry`), and for the HTTP API `tracker.tenants` (tokens and
tenants, `farm.state.tenants`), `tracker.webhooks` (deliveries, `farm.state.webhooks`) and
`tracker.feed` (one job's events, progress and previews, `farm.state.feed`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import NoScriptError

from farm.errors import FarmError, InvalidJob, JobNotFound, StaleAttempt
from farm.jobs.record import Failure, JobRecord, Progress
from farm.jobs.state import JobState
from farm.keys import PRIORITY_STEPS, RedisKeys
from farm.settings import FarmSettings
from farm.state import scripts
from farm.state.batch_index import BatchIndex
from farm.state.connection import Connection
from farm.state.feed import Feed
from farm.state.inflight import InFlight
from farm.state.registry import WorkerRegistry
from farm.state.tenants import Tenants
from farm.state.webhooks import Webhooks

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


SCAN_CHUNK = 1000
"""Job ids read per round trip when a pass walks every live job."""

CREATE_CHUNK = 250
"""Records written per call of the create script: few round trips and decodes, and Redis
never busy with one call for more than a few milliseconds."""


def _flat_record(rec: dict[str, Any]) -> str:
    """A record as the create script takes it: `[id, created_at, field, value, ...]` in
    JSON, every value the string Redis stores; fields that are None are left out."""
    flat = [rec["id"], _stored(rec["created_at"])]
    for k, v in rec.items():
        if v is not None:
            flat += [k, _stored(v)]
    return json.dumps(flat, ensure_ascii=False, separators=(",", ":"))


def _stored(value: Any) -> str:
    """What a record's field holds in Redis: lists and dicts as JSON, numbers as redis-py
    sends them (`repr`), strings as they are."""
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, dict | list) else repr(value)


class Tracker:
    """Job records in Redis. One instance per process; it is thread-safe (redis-py pools)."""

    def __init__(self, conn: Connection, prefix: str = "farm:", record_ttl: int = 7 * 86400):
        self._conn = conn
        self._r = conn.client  # this module's own calls; nothing outside the state wing
        self.keys = RedisKeys(prefix)
        self.record_ttl = record_ttl
        self.batches = BatchIndex(conn, self.keys, scripts.lua_keys(self.keys))
        """The batch index (`farm.state.batch_index`)."""
        self.workers = WorkerRegistry(conn, self.keys)
        """The worker registry (`farm.state.registry`)."""
        self.tenants = Tenants(conn, self.keys, record_ttl)
        """API tokens, tenants' limits and what each owns (`farm.state.tenants`)."""
        self.webhooks = Webhooks(conn, self.keys, record_ttl)
        """Webhook deliveries (`farm.state.webhooks`)."""
        self.feed = Feed(conn, self.keys)
        """One job's events, progress and previews, for followers (`farm.state.feed`)."""
        self._lua_keys = scripts.lua_keys(self.keys)
        self._transition = self._r.register_script(scripts.TRANSITION)
        self._heartbeat = self._r.register_script(scripts.HEARTBEAT)
        self._create = self._r.register_script(scripts.CREATE)
        self._job_fields = self._r.register_script(scripts.JOB_FIELDS)
        self._claim = self._r.register_script(scripts.CLAIM)
        self._take_due = self._r.register_script(scripts.TAKE_DUE)
        self.inflight = InFlight(conn, self.keys, self._lua_keys)
        """The reconciler's view of what is queued, running and in the broker
        (`farm.state.inflight`)."""

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str = "farm:",
        record_ttl: int = 7 * 86400,
        ca_file: str | None = None,
        timeout: float | None = None,
    ) -> Tracker:
        """`redis://` or `rediss://` (TLS, the server verified against `ca_file` or the
        system's CAs); a password in the URL. `timeout`: see `Connection.from_url`."""
        return cls(Connection.from_url(url, ca_file, timeout=timeout), prefix, record_ttl)

    @classmethod
    def from_settings(cls, settings: FarmSettings) -> Tracker:
        ca = str(settings.redis_ca_file) if settings.redis_ca_file else None
        return cls.from_url(
            settings.redis_url or "",
            settings.key_prefix,
            settings.record_ttl,
            ca,
            settings.redis_timeout,
        )

    @property
    def where(self) -> str:
        """`host:port` of the Redis server (never its password)."""
        return self._conn.where

    def doing(self, what: str, job_id: str | None = None) -> Any:
        """The error mapping of `Connection.doing`, for callers that group tracker calls."""
        return self._conn.doing(what, job_id)

    def close(self) -> None:
        self._conn.close()

    def ping(self) -> None:
        """Raise `TransientError` unless the server answers."""
        with self._conn.doing("checking that Redis answers"):
            self._r.ping()

    def server_config(self, name: str) -> str | None:
        """One setting of the server's (`CONFIG GET name`), None where it may not be read."""
        with self._conn.doing(f"reading the server's {name}"):
            try:
                value = self._r.config_get(name)
            except redis.ResponseError:  # CONFIG renamed or forbidden (a managed Redis)
                return None
        return value.get(name) if isinstance(value, dict) else None

    def check_eviction_policy(self) -> None:
        """`InvalidJob` unless the server evicts nothing when full (`maxmemory-policy
        noeviction`, Redis' own default): any other policy silently deletes batches, queue
        lists and queued jobs' records under memory pressure, where `noeviction` refuses the
        write with an error the farm reports ("at its memory limit"). A server that will not
        say (CONFIG renamed, a managed Redis) is taken at its word."""
        policy = self.server_config("maxmemory-policy")
        if policy is not None and policy != "noeviction":
            raise InvalidJob(
                f"Redis at {self.where} has maxmemory-policy {policy}: the farm needs "
                "noeviction (an evicting Redis silently deletes queued jobs and batches); set "
                "`maxmemory-policy noeviction` in its config",
                field="maxmemory-policy",
            )

    # ------------------------------------------------------------------ create / read

    def create(self, records: Sequence[dict[str, Any]]) -> list[bool]:
        """Write new job records (`CREATE_CHUNK` records per script call, `_stream_create`);
        True where created, False where the id existed."""
        with self._conn.doing("creating jobs"):
            try:
                done = self._stream_create(records)
            except NoScriptError:  # a restarted or flushed Redis: no record was written
                self._r.script_load(scripts.CREATE)
                done = self._stream_create(records)  # the index entries again: ZADD NX
            return [bool(x) for part in done for x in part]

    def _stream_create(self, records: Sequence[dict[str, Any]]) -> list[list[int]]:
        """The records' tenant index entries (listed before written: never a job unlisted),
        the create script's calls, then the tenants' pruning, streamed on one connection in
        one round trip: each call is sent once its records are serialized, while Redis runs
        the one before, and the replies are read after the last. A pipeline serializes every
        call before it sends the first, so the client and Redis took turns (10,000 records:
        ~1.5x the time). EVALSHA by hand: a `Script` first asks SCRIPT EXISTS, a round trip
        per submit (per request, for the HTTP API)."""
        before, after = self._r.pipeline(transaction=False), self._r.pipeline(transaction=False)
        self.tenants.index(before, records)
        self.tenants.prune(after, records)
        head = [args for args, _ in before.command_stack]
        tail = [args for args, _ in after.command_stack]
        chunks = [records[i : i + CREATE_CHUNK] for i in range(0, len(records), CREATE_CHUNK)]
        calls: list[Any] = [None] * len(chunks)  # packed once, sent again on a retry
        pool = self._r.connection_pool
        conn = pool.get_connection()

        def stream() -> list[list[int]]:
            out: list[Any] = conn.pack_commands(head) if head else []
            for n, chunk in enumerate(chunks):
                if calls[n] is None:
                    flat = list(map(_flat_record, chunk))
                    calls[n] = conn.pack_command(
                        "EVALSHA", self._create.sha, 0, self._lua_keys, *flat
                    )
                out += calls[n]
                if n < len(chunks) - 1:  # Redis runs this call while the next is serialized
                    conn.send_packed_command([b"".join(out)], check_health=n == 0)
                    out = []
            if tail:
                out += conn.pack_commands(tail)
            conn.send_packed_command([b"".join(out)], check_health=len(chunks) <= 1)
            for _ in head:
                conn.read_response()
            done = [conn.read_response() for _ in chunks]
            for _ in tail:
                conn.read_response()
            return done

        try:  # a lost connection is retried as redis-py retries a call
            return conn.retry.call_with_retry(stream, lambda _: conn.disconnect())
        except BaseException:
            conn.disconnect()  # replies may be left unread on it
            raise
        finally:
            pool.release(conn)

    def get(self, job_id: str) -> JobRecord:
        rec = self.get_many([job_id])[0]
        if rec is None:
            raise JobNotFound("no such job (never submitted, or its record expired)", job_id=job_id)
        return rec

    def get_many(self, job_ids: Iterable[str]) -> list[JobRecord | None]:
        ids = list(job_ids)
        with self._conn.doing("reading job records"):
            pipe = self._r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            raw = pipe.execute()
        return [_record(job_id, h) if h else None for job_id, h in zip(ids, raw, strict=True)]

    def job_fields(self, job_ids: Sequence[str], *fields: str) -> list[list[str | None]]:
        """`fields` of each job's record, in one round trip (None where a field or record is
        missing), one script call per `SCAN_CHUNK` jobs."""
        n = len(fields)
        prefix = self.keys.job("")
        with self._conn.doing("reading job records"):
            pipe = self._r.pipeline(transaction=False)
            for start in range(0, len(job_ids), SCAN_CHUNK):
                chunk = job_ids[start : start + SCAN_CHUNK]
                self._job_fields(args=[prefix, n, *fields, *chunk], client=pipe)
            flat = [v for part in pipe.execute() for v in part]
        return [flat[i : i + n] for i in range(0, len(flat), n)]

    def states(self, job_ids: Sequence[str]) -> list[tuple[str | None, int, int]]:
        """(state, step, total) per job, in one round trip; state None where missing."""
        return [
            (state, int(step or 0), int(total or 0))
            for state, step, total in self.job_fields(job_ids, "state", "step", "total")
        ]

    # ------------------------------------------------------------------ events

    def last_event_id(self) -> str:
        with self._conn.doing("reading the events stream"):
            last: Any = self._r.xrevrange(self.keys.events, count=1)
        return last[0][0] if last else "0-0"

    def wait_event(self, after: str, timeout: float) -> str:
        """Block until an event after `after` arrives or `timeout` passes; the newest id seen."""
        with self._conn.doing("following the events stream"):
            res: Any = self._r.xread(
                {self.keys.events: after}, block=max(1, int(timeout * 1000)), count=1000
            )
        if not res:
            return after
        return res[0][1][-1][0]

    def snapshot(self, job_id: str) -> tuple[str, JobRecord]:
        """(the newest event id, the job's record) read atomically: every event after that id
        happened after the record was read (`farm.state.feed`)."""
        last, raw = self.feed.snapshot(job_id)
        if not raw:
            raise JobNotFound("no such job (never submitted, or its record expired)", job_id=job_id)
        return last, _record(job_id, raw)

    def recent_job_ids(self, limit: int, events_per_job: int = 8) -> list[str]:
        """The jobs whose state changed last, newest first (from the events stream)."""
        with self._conn.doing("reading the events stream"):
            events: Any = self._r.xrevrange(self.keys.events, count=limit * events_per_job)
        ids: list[str] = []
        for _, entry in events:
            job_id = entry.get("job")
            if job_id and job_id not in ids:
                ids.append(job_id)
                if len(ids) == limit:
                    break
        return ids

    def job_ids_by_activity(self, chunk: int = SCAN_CHUNK) -> Iterator[list[str]]:
        """Every job id the farm still knows, most recent activity first, each once, a chunk
        at a time: the events stream read backwards (a job's last state change first), then
        the live jobs it no longer mentions (it is trimmed to `EVENTS_MAXLEN`). What `farm
        jobs` lists: ended jobs leave the live index but stay in the stream, and their
        records stay for `FARM_RECORD_TTL`."""
        seen: set[str] = set()
        end = "+"
        while True:
            with self._conn.doing("reading the events stream"):
                events: Any = self._r.xrevrange(self.keys.events, max=end, count=chunk)
            fresh = [e["job"] for _, e in events if e.get("job") and e["job"] not in seen]
            fresh = list(dict.fromkeys(fresh))
            seen.update(fresh)
            if fresh:
                yield fresh
            if len(events) < chunk:
                break
            end = "(" + events[-1][0]
        start = 0
        while True:  # the jobs that have not ended (the live index), oldest first
            with self._conn.doing("listing live jobs"):
                ids: list[str] = self._r.zrange(self.keys.jobs, start, start + chunk - 1)  # type: ignore[assignment]
            if not ids:
                return
            start += chunk
            fresh = [job_id for job_id in ids if job_id not in seen]
            seen.update(fresh)
            if fresh:
                yield fresh

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
        with self._conn.doing(f"moving a job to {JobState(to).value}", job_id):
            status, state, new_token, attempt = self._transition(
                keys=[self.keys.job(job_id)],
                args=[
                    JobState(to).value,
                    token or "",
                    ",".join(JobState(s).value for s in expect),
                    json.dumps(payload),
                    job_id,
                    self._context(lease, worker),
                ],
            )
        if status == "missing":
            raise JobNotFound("no such job", job_id=job_id)
        return Transition(status, JobState(state), new_token, int(attempt))

    def _context(self, lease: float, worker: str) -> str:
        """What `apply` shares across one call's changes (`farm.state.scripts`)."""
        return (
            f'{{"K": {self._lua_keys}, "now": "{time.time()!r}", "ttl": {self.record_ttl}, '
            f'"lease": {float(lease)!r}, "worker": {json.dumps(worker)}, '
            f'"nonce": "{uuid.uuid4().hex[:12]}", "maxlen": {EVENTS_MAXLEN}}}'
        )

    def claim(self, job_id: str, worker: str, lease: float) -> Transition:
        """Start an attempt: queued → running (or take over a running job whose lease ran out)."""
        return self.transition(job_id, JobState.RUNNING, worker=worker, lease=lease)

    def claim_and_gather(
        self, job_id: str, worker: str, lease: float, max_images: int
    ) -> tuple[Transition, list[tuple[JobRecord, Transition]]]:
        """Claim job `job_id` (as `claim`) and, where it has a batch signature, queued jobs of
        that signature up to `max_images` images in all, most urgent first; and read their
        records: one round trip, where claim, read, gather and read again took four.

        (the lead's transition, [(record, transition)] with the lead first when it was
        claimed). `JobNotFound` for a lead with no record."""
        lead, claimed = self._claim_many(job_id, "", max_images, worker, lease)
        assert lead is not None
        return lead, claimed

    def claim_batch(
        self, signature: str, worker: str, lease: float, n: int
    ) -> list[tuple[JobRecord, Transition]]:
        """Claim up to `n` queued jobs with this batch signature, most urgent first, in one step,
        with their records.

        Each gets its own attempt token and lease, by the same rules as `claim`. Ids in the
        index that are no longer queued (cancelled, claimed by their own message) are dropped.
        """
        if n < 1:
            return []
        return self._claim_many("", signature, n, worker, lease)[1]

    def _claim_many(
        self, lead: str, signature: str, n: int, worker: str, lease: float
    ) -> tuple[Transition | None, list[tuple[JobRecord, Transition]]]:
        """The `CLAIM` script (`farm.state.scripts`)."""
        with self._conn.doing("claiming jobs", lead or None):
            out = self._claim(args=[lead, signature, n, self._context(lease, worker)])
        first = None
        claimed = []
        if lead:
            status, state, token, attempt, *raw = out.pop(0)
            if status == "missing":
                raise JobNotFound("no such job", job_id=lead)
            first = Transition(status, JobState(state), token, int(attempt))
            if first.ok:
                claimed.append((_record(lead, _pairs(raw[0])), first))
        for job_id, token, attempt, raw in out:
            running = Transition("ok", JobState.RUNNING, token, int(attempt))
            claimed.append((_record(job_id, _pairs(raw)), running))
        return first, claimed

    def queued_with(self, signature: str) -> list[str]:
        """Ids of the queued jobs with this batch signature, most urgent first."""
        with self._conn.doing("reading a batch signature's queued jobs"):
            return self._r.zrange(self.keys.signature(signature), 0, -1)  # type: ignore[return-value]

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
        with self._conn.doing("renewing a lease", job_id):
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
        with self._conn.doing("renewing leases"):
            pipe = self._r.pipeline(transaction=False)
            for job_id, token, step, total, *loss in beats:
                args: list[str | int | float] = [token, until, step, total]
                if loss and loss[0] is not None:
                    args.append(repr(float(loss[0])))
                self._heartbeat(keys=[self.keys.job(job_id)], args=args, client=pipe)
            replies = pipe.execute()
        out = {}
        for (job_id, *_), (status, value) in zip(beats, replies, strict=True):
            out[job_id] = "stale" if status != "ok" else "cancel" if value == "1" else "ok"
        return out

    def request_cancel(self, job_id: str) -> JobState:
        """Cancel a queued (or waiting) job at once; ask a running one to stop at its next step."""
        t = self.transition(job_id, JobState.CANCELLED, expect=[JobState.QUEUED, JobState.WAITING])
        if t.ok or t.state != JobState.RUNNING:
            return t.state
        with self._conn.doing("asking a running job to stop", job_id):
            pipe = self._r.pipeline(transaction=False)
            pipe.hset(self.keys.job(job_id), "cancel", "1")  # seen by the next heartbeat
            pipe.publish(self.keys.cancels, job_id)  # seen at once by a listening worker
            pipe.execute()
        return JobState.RUNNING

    def cancel_messages(self) -> Iterator[str]:
        """Ids of running jobs whose cancel is published from now on (blocks; one worker's
        listener thread follows it, and reconnects when it raises)."""
        with self._conn.doing("following the cancel channel"):
            pubsub = self._r.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(self.keys.cancels)
            for message in pubsub.listen():
                yield message["data"]

    def set_fields(self, job_id: str, **fields: Any) -> None:
        """Write non-state fields (the `error` of a failed delivery, say). Never `state`."""
        assert "state" not in fields and "token" not in fields
        with self._conn.doing("writing a job's record", job_id):
            self._r.hset(self.keys.job(job_id), mapping=dict[Any, Any](fields))

    def set_fields_many(self, updates: Mapping[str, Mapping[str, Any]]) -> None:
        """`set_fields` for several jobs (job id → fields), in one round trip."""
        if not updates:
            return
        with self._conn.doing("writing job records"):
            pipe = self._r.pipeline(transaction=False)
            for job_id, fields in updates.items():
                assert "state" not in fields and "token" not in fields
                pipe.hset(self.keys.job(job_id), mapping=dict[Any, Any](fields))
            pipe.execute()

    # ------------------------------------------------------------------ retries with backoff

    def schedule_retry(self, job_id: str, due: float) -> None:
        """Send a handed-back job's message again at `due` (epoch seconds), not now: the
        reconciler takes it from `RedisKeys.retries` once that time has come."""
        with self._conn.doing("scheduling a retry", job_id):
            self._r.zadd(self.keys.retries, {job_id: due})

    def take_due_retries(self, now: float, n: int = SCAN_CHUNK) -> list[str]:
        """Remove and return up to `n` job ids whose retry is due (atomic: each is taken once)."""
        with self._conn.doing("taking due retries"):
            return list(self._take_due(keys=[self.keys.retries], args=[repr(now), n]))

    # ------------------------------------------------------------------ dependencies

    def add_dependents(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Add each waiting record to the dependents of the jobs it waits for."""
        waiting = [rec for rec in records if rec.get("depends_on")]
        if not waiting:
            return
        with self._conn.doing("registering waiting jobs"):
            pipe = self._r.pipeline(transaction=False)
            for rec in waiting:
                for parent in rec["depends_on"]:
                    key = self.keys.dependents(parent)
                    pipe.sadd(key, rec["id"])
                    pipe.expire(key, self.record_ttl)
            pipe.execute()

    def dependents(self, job_id: str) -> list[str]:
        """Ids of the jobs waiting for `job_id`, sorted."""
        with self._conn.doing("reading waiting jobs", job_id):
            return sorted(self._r.smembers(self.keys.dependents(job_id)))  # type: ignore[arg-type]

    def forget_dependents(self, job_id: str, ids: Sequence[str]) -> None:
        if ids:
            with self._conn.doing("releasing waiting jobs", job_id):
                self._r.srem(self.keys.dependents(job_id), *ids)

    # ------------------------------------------------------------------ counts, queues, locks

    def counts(self) -> dict[str, int]:
        """Jobs per state, from the counters the state scripts keep (`RedisKeys.counts`): live
        states now, ended states ever. One read, whatever the farm's size."""
        with self._conn.doing("reading job counts"):
            raw: dict[str, str] = self._r.hgetall(self.keys.counts)  # type: ignore[assignment]
        return {state.value: int(raw.get(state.value, 0)) for state in JobState}

    def queue_lengths(self, queues: Iterable[str]) -> dict[str, dict[int, int]]:
        """Messages waiting per queue and kombu priority step, in one round trip (kombu keeps
        one list per queue and step: `RedisKeys.broker_queue`)."""
        names = sorted(set(queues))
        with self._conn.doing("reading queue depths"):
            pipe = self._r.pipeline(transaction=False)
            for queue in names:
                for step in PRIORITY_STEPS:
                    pipe.llen(self.keys.broker_queue(queue, step))
            sizes = iter(pipe.execute())
        return {q: {step: next(sizes) for step in PRIORITY_STEPS} for q in names}

    def queue_depths(self, queues: Iterable[str]) -> dict[str, int]:
        """Messages waiting in each queue, every priority list counted: what `farm workers`,
        the dashboard, metrics and KEDA read."""
        return {q: sum(steps.values()) for q, steps in self.queue_lengths(queues).items()}


def require_noeviction(settings: FarmSettings) -> None:
    """What `farm worker` and `farm up` check before they start: the farm's Redis evicts
    nothing (`Tracker.check_eviction_policy`)."""
    tracker = Tracker.from_settings(settings)
    try:
        tracker.check_eviction_policy()
    finally:
        tracker.close()


def _pairs(flat: list[str]) -> dict[str, str]:
    """HGETALL's reply as a Lua script returns it (field, value, ...) → a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


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
        failure=_failure(h.get("failure")),
        outputs=json.loads(h.get("outputs", "[]")),
        mask=h.get("mask") or None,
        meta=h.get("meta") or None,
        signature=h.get("signature") or None,
        queue=h.get("queue") or None,
        depends_on=json.loads(h.get("depends_on", "[]")),
        batch=h.get("batch") or None,
        slot=h.get("slot") or None,
    )


def _failure(value: str | None) -> Failure | None:
    try:
        return Failure(value) if value else None
    except ValueError:  # written by a newer farm: not this one's to judge
        return None
