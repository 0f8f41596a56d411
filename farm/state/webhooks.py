"""Webhook deliveries in Redis: at least once, each under a stable id, retried with backoff.

    farm:events                  the events stream, read by the consumer group `webhooks`
    farm:webhooks                sorted set: delivery id → when its next attempt is due
    farm:webhook:<delivery>      hash: url, tenant, event id, body, attempts (JSON), outcome

The sender (`farm.api.sender`) reads the events stream as a consumer group, so an event it
read but did not acknowledge (it died) is read again; turning an ended job into a delivery is
idempotent (`enqueue` creates it once, under the job's own delivery id), so reading twice
delivers once more at worst, never never. A delivery being attempted is leased (its due time
pushed forward), so two senders never post it at once and a dead sender's is retried.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import redis

from farm.keys import RedisKeys
from farm.state.connection import Connection

GROUP = "webhooks"
"""The consumer group of the events stream that the webhook sender reads."""

ENQUEUE = """
-- KEYS: the delivery, the due set; ARGV: due, id, ttl, field, value, ...
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

TAKE = """
-- KEYS: the due set; ARGV: now, lease until, n. Due ids, each leased until ARGV[2].
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id) end
return ids
"""


class Webhooks:
    """The delivery queue (`tracker.webhooks`)."""

    def __init__(self, conn: Connection, keys: RedisKeys, record_ttl: int) -> None:
        self._conn = conn
        self._keys = keys
        self._ttl = record_ttl
        self._enqueue = conn.client.register_script(ENQUEUE)
        self._take = conn.client.register_script(TAKE)

    # ------------------------------------------------------------------ the events stream

    def join(self) -> None:
        """Create the consumer group (from the stream's start: no end is missed because the
        sender started late) unless it exists."""
        with self._conn.doing("joining the events stream's webhook group"):
            try:
                self._conn.client.xgroup_create(self._keys.events, GROUP, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def read(
        self, consumer: str, count: int, block: float, pending: bool = False
    ) -> list[tuple[str, dict[str, str]]]:
        """Events for this consumer: new ones (`pending`: those it read and did not ack)."""
        with self._conn.doing("reading the events stream"):
            res: Any = self._conn.client.xreadgroup(
                GROUP,
                consumer,
                {self._keys.events: "0" if pending else ">"},
                count=count,
                block=None if pending else max(1, int(block * 1000)),
            )
        return [(i, f) for i, f in res[0][1] if f] if res else []

    def reclaim(self, consumer: str, idle: float, count: int) -> list[tuple[str, dict[str, str]]]:
        """Events another (dead) consumer read and left unacknowledged for `idle` seconds."""
        with self._conn.doing("reclaiming events"):
            res: Any = self._conn.client.xautoclaim(
                self._keys.events, GROUP, consumer, int(idle * 1000), "0-0", count=count
            )
        return [(i, f) for i, f in res[1] if f]

    def ack(self, ids: Sequence[str]) -> None:
        if ids:
            with self._conn.doing("acknowledging events"):
                self._conn.client.xack(self._keys.events, GROUP, *ids)

    # ------------------------------------------------------------------ deliveries

    def enqueue(self, delivery: str, fields: dict[str, Any], due: float | None = None) -> bool:
        """Create a delivery due now (or at `due`); False if it existed already."""
        flat: list[Any] = []
        for k, v in {**fields, "attempts": "[]", "outcome": "pending"}.items():
            flat += [k, v if isinstance(v, str) else json.dumps(v)]
        with self._conn.doing("queueing a webhook"):
            return bool(
                self._enqueue(
                    keys=[self._keys.webhook(delivery), self._keys.webhooks],
                    args=[repr(due or time.time()), delivery, self._ttl, *flat],
                )
            )

    def take_due(self, now: float, lease: float, n: int) -> list[str]:
        with self._conn.doing("taking due webhooks"):
            return list(
                self._take(keys=[self._keys.webhooks], args=[repr(now), repr(now + lease), n])
            )

    def get(self, delivery: str) -> dict[str, Any] | None:
        with self._conn.doing("reading a webhook"):
            raw: dict[str, str] = self._conn.client.hgetall(self._keys.webhook(delivery))  # type: ignore[assignment]
        if not raw:
            return None
        out: dict[str, Any] = dict(raw)
        out["attempts"] = json.loads(raw.get("attempts", "[]"))
        return out

    def attempted(
        self, delivery: str, attempt: dict[str, Any], outcome: str, next_due: float | None
    ) -> None:
        """Record one attempt; `outcome` pending (then `next_due`), delivered or failed."""
        key = self._keys.webhook(delivery)
        with self._conn.doing("recording a webhook attempt"):
            attempts = json.loads(self._conn.client.hget(key, "attempts") or "[]")
            attempts.append(attempt)
            pipe = self._conn.client.pipeline(transaction=True)
            pipe.hset(key, mapping={"attempts": json.dumps(attempts), "outcome": outcome})
            if next_due is None:
                pipe.zrem(self._keys.webhooks, delivery)
            else:
                pipe.zadd(self._keys.webhooks, {delivery: next_due}, xx=True)
            pipe.execute()
