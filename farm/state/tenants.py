"""API tokens and tenants in Redis: who may call the HTTP API, and what each tenant owns.

    farm:tokens                  hash: token id → JSON (name, tenant, scopes, sha256, created)
    farm:tenant:<t>              hash: limits and the tenant's webhook signing secret
    farm:tenant:<t>:jobs         sorted set: the tenant's job ids by creation time
    farm:tenant:<t>:open         sorted set: its jobs not yet seen ended (the queued limit)
    farm:tenant:<t>:inputs       set: storage keys of the inputs it uploaded
    farm:tenant:<t>:bucket       hash: its jobs-per-minute token bucket
    farm:batch-tenants           hash: batch name → tenant
    farm:batch-webhooks          hash: batch name → the URL POSTed once it has settled
    farm:api-session-key         string: the key dashboard session cookies are signed with

A token is `farm_<id>_<secret>`, printed once. Redis keeps the id and the sha256 of the
secret, never the secret: a token is found by its id and its secret compared in constant time
(`hmac.compare_digest`), so neither a lookup's timing nor a dump of Redis gives a token away.
Secrets are 32 random bytes, so a plain sha256 suffices (no password stretching is needed for
a secret nobody chose). Nothing is cached: a revoked token is refused by the next request.

Inputs are content-addressed and shared across tenants (one stored copy of a picture however
many tenants upload it, the store's keys unchanged), and each tenant has the set of the keys
it uploaded: a spec may name only those. Tenant-scoped keys would duplicate the bytes and
change every worker's key layout for no gain in isolation: an upload answers the same URI
whether or not another tenant stored the same bytes first, so the set leaks nothing.

Records carry their `tenant` field (none: the `default` tenant, whatever the SDK and the CLI
write over Redis directly). `Tracker.create` indexes a tenant's records in the same pipeline
that writes them (`index`), before the records, so a job is never written unlisted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from farm.errors import InvalidJob
from farm.jobs.state import JobState
from farm.keys import RedisKeys
from farm.state.connection import Connection

DEFAULT_TENANT = "default"
"""The tenant of records written without one (the SDK and CLI over Redis, `farm up`)."""

SCOPES = ("read", "submit", "admin")
"""read: GET routes; submit: jobs, inputs, batches, cancels; admin: everything, workers too."""

TENANT = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

LIMITS = ("max_queued", "jobs_per_minute", "max_images")
"""Per-tenant limits (0: none): jobs not yet ended, jobs accepted per minute (a token bucket
whose burst is one minute's worth), images per job."""

SCAN_CHUNK = 1000

PRUNE_LOOK = 32
"""How many of a tenant's oldest index entries each write looks at for expired records."""

PRUNE_JOBS = """
-- KEYS[1]: a tenant's job index; ARGV: the cutoff score, the job records' key prefix, how many.
-- Drops the oldest ids, created before the cutoff, whose records have expired: the index holds
-- what `GET /v1/jobs` can still show, not every job the tenant ever submitted.
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local gone = {}
for _, id in ipairs(old) do
  if redis.call('EXISTS', ARGV[2] .. id) == 0 then gone[#gone + 1] = id end
end
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return #gone
"""

TOKEN_BUCKET = """
-- KEYS[1]: the bucket; ARGV: now, rate (tokens/s), capacity, n, ttl, force.
-- Takes n tokens and returns {1, 0}, or takes none (writes nothing) and returns {0, wait};
-- with force, takes them whatever is left (the bucket may go below zero: later takes wait).
local now, rate, cap, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]) or cap, tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
if tokens >= n or ARGV[6] == '1' then
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens - n), 'ts', string.format('%.6f', now))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  return {1, '0'}
end
return {0, string.format('%.3f', (n - tokens) / rate)}
"""


def check_tenant(name: str) -> str:
    if not isinstance(name, str) or not TENANT.match(name):
        raise InvalidJob(
            f"tenant: {name!r} is not a tenant name (a-z, 0-9 and '-', up to 32)", field="tenant"
        )
    return name


def check_scopes(scopes: Iterable[str]) -> list[str]:
    out = sorted({s.strip() for s in scopes if s.strip()})
    wrong = [s for s in out if s not in SCOPES]
    if wrong or not out:
        raise InvalidJob(
            f"scopes: choose from {', '.join(SCOPES)}, got {','.join(out) or 'none'}",
            field="scopes",
        )
    return out


@dataclass(frozen=True, slots=True)
class Token:
    """What Redis knows of a token (never its secret)."""

    id: str
    name: str
    tenant: str
    scopes: tuple[str, ...]
    created_at: float

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


@dataclass(frozen=True, slots=True)
class Limits:
    max_queued: int = 0
    jobs_per_minute: int = 0
    max_images: int = 0


@dataclass
class Open:
    """What `Tenants.open_jobs` found: how many of a tenant's jobs have not ended."""

    count: int
    ended: list[str] = field(default_factory=list)
    """Ids seen ended (or expired): dropped from the open set by the next write."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Tenants:
    """Tokens, tenants' limits, and what each tenant owns (`tracker.tenants`)."""

    def __init__(self, conn: Connection, keys: RedisKeys, record_ttl: int) -> None:
        self._conn = conn
        self._keys = keys
        self._ttl = record_ttl
        self._bucket = conn.client.register_script(TOKEN_BUCKET)

    # ------------------------------------------------------------------ tokens

    def create_token(self, name: str, tenant: str, scopes: Iterable[str]) -> tuple[Token, str]:
        """A new token: (what Redis keeps, the token itself, to be shown once)."""
        if not TOKEN_NAME.match(name or ""):
            raise InvalidJob(
                f"name: {name!r} is not a token name (letters, digits, '.', '_', '-')",
                field="name",
            )
        token = Token(
            secrets.token_hex(6),
            name,
            check_tenant(tenant),
            tuple(check_scopes(scopes)),
            time.time(),
        )
        secret = secrets.token_urlsafe(32)
        entry = {
            "name": token.name,
            "tenant": token.tenant,
            "scopes": list(token.scopes),
            "sha256": _hash(secret),
            "created_at": token.created_at,
        }
        with self._conn.doing("creating an API token"):
            self._conn.client.hset(self._keys.tokens, token.id, json.dumps(entry))
        self.webhook_secret(tenant)  # every tenant with a token has one
        return token, f"farm_{token.id}_{secret}"

    def tokens(self) -> list[Token]:
        with self._conn.doing("listing API tokens"):
            raw: dict[str, str] = self._conn.client.hgetall(self._keys.tokens)  # type: ignore[assignment]
        out = [_token(tid, json.loads(v)) for tid, v in raw.items()]
        return sorted(out, key=lambda t: (t.tenant, t.name, t.created_at))

    def token(self, token_id: str) -> Token | None:
        with self._conn.doing("checking an API token"):
            raw = self._conn.client.hget(self._keys.tokens, token_id)
        return _token(token_id, json.loads(raw)) if raw else None

    def session_key(self) -> bytes:
        """The key dashboard sessions are signed with, made on first use, shared by replicas."""
        with self._conn.doing("reading the API's session key"):
            self._conn.client.set(self._keys.session_key, secrets.token_hex(32), nx=True)
            value = self._conn.client.get(self._keys.session_key)
        return bytes.fromhex(str(value))

    def revoke(self, name_or_id: str) -> list[Token]:
        """Delete the tokens with this id or name; the ones deleted."""
        gone = [t for t in self.tokens() if name_or_id in (t.id, t.name)]
        if gone:
            with self._conn.doing("revoking API tokens"):
                self._conn.client.hdel(self._keys.tokens, *[t.id for t in gone])
        return gone

    def authenticate(self, token: str) -> Token | None:
        """The token's entry if `token` is a live one, else None (read from Redis each time)."""
        parts = token.split("_", 2) if isinstance(token, str) else []
        if len(parts) != 3 or parts[0] != "farm" or not re.fullmatch(r"[0-9a-f]{12}", parts[1]):
            return None
        with self._conn.doing("checking an API token"):
            raw = self._conn.client.hget(self._keys.tokens, parts[1])
        if not raw:
            hmac.compare_digest(_hash(parts[2]), _hash(""))  # the same work either way
            return None
        entry = json.loads(raw)
        if not hmac.compare_digest(_hash(parts[2]), entry.get("sha256", "")):
            return None
        return _token(parts[1], entry)

    # ------------------------------------------------------------------ tenants

    def limits(self, tenant: str, defaults: Limits) -> Limits:
        """The tenant's own limits where it has them, else `defaults`."""
        with self._conn.doing(f"reading tenant {tenant!r}"):
            raw = self._conn.client.hmget(self._keys.tenant(tenant), list(LIMITS))
        own = {k: int(v) for k, v in zip(LIMITS, raw, strict=True) if v is not None}
        return Limits(**{k: own.get(k, getattr(defaults, k)) for k in LIMITS})

    def set_limits(self, tenant: str, **limits: int | None) -> None:
        """Set (a number, 0 for none) or clear (None: back to the settings' default) limits."""
        check_tenant(tenant)
        with self._conn.doing(f"writing tenant {tenant!r}"):
            pipe = self._conn.client.pipeline(transaction=True)
            for name, value in limits.items():
                assert name in LIMITS, name
                if value is None:
                    pipe.hdel(self._keys.tenant(tenant), name)
                else:
                    pipe.hset(self._keys.tenant(tenant), name, int(value))
            pipe.execute()

    def webhook_secret(self, tenant: str) -> str:
        """The secret the tenant's webhooks are signed with (made on first use)."""
        key = self._keys.tenant(tenant)
        with self._conn.doing(f"reading tenant {tenant!r}"):
            secret = self._conn.client.hget(key, "webhook_secret")
            if not secret:
                self._conn.client.hsetnx(key, "webhook_secret", "whsec_" + secrets.token_hex(24))
                secret = self._conn.client.hget(key, "webhook_secret")
        return str(secret)

    def take(self, tenant: str, n: int, per_minute: int, *, force: bool = False) -> float:
        """Take `n` jobs from the tenant's jobs-per-minute bucket: 0.0 if taken, else the
        seconds until there would be room (and nothing taken). `force`: take them anyway
        (for jobs already written: a batch, checked with `room` first)."""
        if per_minute <= 0 or n <= 0:
            return 0.0
        with self._conn.doing("taking from a rate limit"):
            ok, wait = self._bucket(
                keys=[self._keys.tenant_bucket(tenant)],
                args=[repr(time.time()), per_minute / 60.0, per_minute, n, 3600, int(force)],
            )
        return 0.0 if int(ok) else max(0.001, float(wait))

    def open_jobs(self, tenant: str, limit: int, n: int) -> Open:
        """How many of the tenant's jobs have not ended, reading their states only when the
        open set alone says `n` more would pass `limit` (O(1) while well under it)."""
        key = self._keys.tenant_open(tenant)
        with self._conn.doing("counting a tenant's jobs"):
            size = int(self._conn.client.zcard(key))
            if limit <= 0 or size + n <= limit:
                return Open(size)
            ids: list[str] = self._conn.client.zrange(key, 0, -1)  # type: ignore[assignment]
            ended: list[str] = []
            for start in range(0, len(ids), SCAN_CHUNK):
                chunk = ids[start : start + SCAN_CHUNK]
                pipe = self._conn.client.pipeline(transaction=False)
                for job_id in chunk:
                    pipe.hget(self._keys.job(job_id), "state")
                for job_id, state in zip(chunk, pipe.execute(), strict=True):
                    if state is None or JobState(state).terminal:
                        ended.append(job_id)
        return Open(len(ids) - len(ended), ended)

    def forget_ended(self, tenant: str, ended: Sequence[str]) -> None:
        if ended:
            with self._conn.doing("pruning a tenant's open jobs"):
                self._conn.client.zrem(self._keys.tenant_open(tenant), *ended)

    # ------------------------------------------------------------------ what a tenant owns

    def index(self, pipe: Any, records: Sequence[dict[str, Any]]) -> None:
        """Queue, on `pipe`, the tenant index entries of the records that name a tenant."""
        for rec in records:
            tenant = rec.get("tenant")
            if tenant:
                score = float(rec["created_at"])
                pipe.zadd(self._keys.tenant_jobs(tenant), {rec["id"]: score}, nx=True)
                pipe.zadd(self._keys.tenant_open(tenant), {rec["id"]: score}, nx=True)

    def prune(self, pipe: Any, records: Sequence[dict[str, Any]]) -> None:
        """Queue, on `pipe` after the records' writes, the removal of each of their tenants'
        oldest index entries whose records have expired: each write looks at `PRUNE_LOOK`
        entries created more than a record's lifetime ago, so the index stays the size of what
        is still stored."""
        cutoff = repr(time.time() - self._ttl)
        for tenant in sorted({rec["tenant"] for rec in records if rec.get("tenant")}):
            key = self._keys.tenant_jobs(tenant)
            pipe.eval(PRUNE_JOBS, 1, key, cutoff, self._keys.job(""), PRUNE_LOOK)

    def job_tenants(self, job_ids: Sequence[str]) -> list[str | None]:
        """Each job's tenant (`default` where the record has none), None where it is missing."""
        with self._conn.doing("reading job records"):
            pipe = self._conn.client.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hmget(self._keys.job(job_id), ["state", "tenant"])
            rows = pipe.execute()
        return [None if state is None else (t or DEFAULT_TENANT) for state, t in rows]

    def job_page(
        self, tenant: str, before: tuple[float, str] | None, count: int
    ) -> list[tuple[str, float]]:
        """Up to `count` of the tenant's job ids, newest first, strictly after the cursor
        `before` (the (score, id) of the last one of the previous page)."""
        key = self._keys.tenant_jobs(tenant)
        top: Any = "+inf" if before is None else before[0]
        out: list[tuple[str, float]] = []
        with self._conn.doing("listing a tenant's jobs"):
            raw: Any = self._conn.client.zrevrangebyscore(
                key, top, "-inf", start=0, num=count + 64, withscores=True
            )
        for job_id, score in raw:
            if before is not None and score == before[0] and job_id >= before[1]:
                continue  # ties on the cursor's score: members come in reverse order
            out.append((job_id, score))
            if len(out) == count:
                break
        return out

    def add_inputs(self, tenant: str, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            with self._conn.doing("recording a tenant's inputs"):
                self._conn.client.sadd(self._keys.tenant_inputs(tenant), *keys)

    def owns_inputs(self, tenant: str, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        with self._conn.doing("reading a tenant's inputs"):
            return [
                bool(x)
                for x in self._conn.client.smismember(self._keys.tenant_inputs(tenant), list(keys))
            ]

    def batch_tenants(self, names: Sequence[str]) -> list[str]:
        if not names:
            return []
        with self._conn.doing("reading batches' tenants"):
            owners = self._conn.client.hmget(self._keys.batch_tenants, list(names))
        return [str(o) if o else DEFAULT_TENANT for o in owners]

    def set_batch_webhook(self, name: str, url: str | None) -> None:
        """The URL POSTed once batch `name` has settled; None: none."""
        with self._conn.doing(f"writing batch {name!r}"):
            if url is None:
                self._conn.client.hdel(self._keys.batch_webhooks, name)
            else:
                self._conn.client.hset(self._keys.batch_webhooks, name, url)

    def batch_webhook(self, name: str) -> str | None:
        with self._conn.doing(f"reading batch {name!r}"):
            url = self._conn.client.hget(self._keys.batch_webhooks, name)
        return str(url) if url else None

    def batch_tenant(self, name: str) -> str:
        """The tenant a batch belongs to (`default` unless the API submitted it)."""
        with self._conn.doing(f"reading batch {name!r}"):
            owner = self._conn.client.hget(self._keys.batch_tenants, name)
        return str(owner) if owner else DEFAULT_TENANT

    def claim_batch(self, name: str, tenant: str) -> bool:
        """Mark a batch name as the tenant's; False if another tenant holds it."""
        with self._conn.doing(f"writing batch {name!r}"):
            self._conn.client.hsetnx(self._keys.batch_tenants, name, tenant)
            owner = self._conn.client.hget(self._keys.batch_tenants, name)
        return owner == tenant


def _token(token_id: str, entry: dict[str, Any]) -> Token:
    return Token(
        token_id,
        entry["name"],
        entry["tenant"],
        tuple(entry.get("scopes", [])),
        float(entry.get("created_at", 0.0)),
    )
