"""The batch index in Redis: each batch's metadata, its slots in manifest order, and per slot
its current job and what the fetched dataset needs (`farm.batches` reads and writes it).

    farm:batches                 sorted set: every batch name, scored by its first submit
    farm:batch:<name>            hash: metadata (manifest, rows, variations, seed, defaults)
    farm:batch:<name>:order      list: slot ids in manifest order
    farm:batch:<name>:slots      hash: slot id → JSON (job id, generation, row, labels, ...)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from farm.keys import RedisKeys
from farm.state.connection import Connection

ORDER_CHUNK = 10_000
"""Slot ids pushed per RPUSH when the order is rewritten."""


class BatchIndex:
    """Read and write the batch index."""

    def __init__(self, conn: Connection, keys: RedisKeys) -> None:
        self._conn = conn
        self._keys = keys

    def meta(self, name: str) -> dict[str, Any] | None:
        """A batch's metadata, or None when no batch has this name."""
        with self._conn.doing(f"reading batch {name!r}"):
            raw: dict[str, str] = self._conn.client.hgetall(self._keys.batch(name))  # type: ignore[assignment]
        return {k: json.loads(v) for k, v in raw.items()} if raw else None

    def names(self, *, newest_first: bool = False, limit: int | None = None) -> list[str]:
        """Batch names, oldest (or newest) first."""
        end = -1 if limit is None else limit - 1
        with self._conn.doing("listing batches"):
            if newest_first:
                return self._conn.client.zrevrange(self._keys.batches, 0, end)  # type: ignore[return-value]
            return self._conn.client.zrange(self._keys.batches, 0, end)  # type: ignore[return-value]

    def order(self, name: str, limit: int | None = None) -> list[str]:
        """The batch's slot ids in manifest order (the first `limit`)."""
        end = -1 if limit is None else limit - 1
        with self._conn.doing(f"reading batch {name!r}"):
            return self._conn.client.lrange(self._keys.batch_order(name), 0, end)  # type: ignore[return-value]

    def slots(self, name: str, slot_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Each slot's entry (None where the slot has none yet)."""
        if not slot_ids:
            return []
        with self._conn.doing(f"reading batch {name!r}"):
            raw = self._conn.client.hmget(self._keys.batch_slots(name), list(slot_ids))
        return [json.loads(v) if v else None for v in raw]

    def set_slots(self, name: str, entries: Mapping[str, Mapping[str, Any]]) -> None:
        """Write slot entries (slot id → entry)."""
        if not entries:
            return
        mapping: dict[Any, Any] = {slot: json.dumps(entry) for slot, entry in entries.items()}
        with self._conn.doing(f"writing batch {name!r}"):
            self._conn.client.hset(self._keys.batch_slots(name), mapping=mapping)

    def write(self, name: str, meta: Mapping[str, Any], order: Sequence[str], now: float) -> None:
        """The batch's metadata and its slot order, replacing an earlier order, in one
        transaction (first submitted: `now`, unless it was submitted before)."""
        keys = self._keys
        with self._conn.doing(f"writing batch {name!r}"):
            pipe = self._conn.client.pipeline(transaction=True)
            pipe.zadd(keys.batches, {name: now}, nx=True)
            pipe.hsetnx(keys.batch(name), "created_at", json.dumps(now))
            pipe.hset(keys.batch(name), mapping={k: json.dumps(v) for k, v in meta.items()})
            pipe.delete(keys.batch_order(name))
            for start in range(0, len(order), ORDER_CHUNK):
                pipe.rpush(keys.batch_order(name), *order[start : start + ORDER_CHUNK])
            pipe.execute()
