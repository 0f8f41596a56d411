"""The batch index in Redis: each batch's metadata, its slots in manifest order, and per slot
its current job and what the fetched dataset needs (`farm.batches` reads and writes it).

    farm:batches                 sorted set: every batch name, scored by its first submit
    farm:batch:<name>            hash: metadata (manifest, rows, variations, seed, defaults)
    farm:batch:<name>:order      list: slot ids in manifest order
    farm:batch:<name>:slots      hash: slot id → JSON (job id, generation, row, labels, ...)
    farm:batch:<name>:counts     hash: its current jobs and their images per state, first
                                 start, last success (kept by the state scripts)
    farm:batch:<name>:failed     sorted set: its current jobs that failed, by when

A job counts in its batch while it is the current job of one of the batch's slots: writing
the slots (`set_slots`, one script with the state changes' own bookkeeping,
`farm.state.scripts.INDEX_SLOTS`) gives the job's record its `batch` and `slot` and counts it in
the state it is in; from then on every state change moves its count in the same atomic step.
A slot that gets a new job (a retry) or leaves the manifest's order takes its old job out. So
a batch's status reads one hash, whatever its size (`counts`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from farm.keys import RedisKeys
from farm.state.connection import Connection
from farm.state.scripts import INDEX_SLOTS

ORDER_CHUNK = 10_000
"""Slot ids pushed per RPUSH when the order is rewritten."""

SLOTS_CHUNK = 1000
"""Slots written per atomic step."""


class BatchIndex:
    """Read and write the batch index."""

    def __init__(self, conn: Connection, keys: RedisKeys, lua_keys: str) -> None:
        self._conn = conn
        self._keys = keys
        self._lua_keys = lua_keys
        self._index = conn.client.register_script(INDEX_SLOTS)

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
        """Write slot entries (slot id → entry with its current `job`), counting each job in
        the batch (and a replaced one out), in chunks of atomic steps."""
        items = list(entries.items())
        for start in range(0, len(items), SLOTS_CHUNK):
            args: list[str] = []
            for slot, entry in items[start : start + SLOTS_CHUNK]:
                job = str(entry["job"])
                args += [slot, json.dumps({"job": job, **entry}), job]
            self._run_index(name, args)

    def counts(self, name: str) -> dict[str, float]:
        """The batch's counters (`RedisKeys.batch_counts`): `<state>` and `images:<state>` of its
        current jobs, `started_at` (first start) and `finished_at` (last success). One read."""
        with self._conn.doing(f"reading batch {name!r}"):
            raw: dict[str, str] = self._conn.client.hgetall(self._keys.batch_counts(name))  # type: ignore[assignment]
        return {k: float(v) for k, v in raw.items()}

    def failed(self, name: str, limit: int | None = None) -> list[str]:
        """Ids of the batch's current jobs that failed, first failed first (the first `limit`):
        O(failed), whatever the batch's size. Their records name their slot (`slot`)."""
        end = -1 if limit is None else limit - 1
        with self._conn.doing(f"reading batch {name!r}"):
            return self._conn.client.zrange(self._keys.batch_failed(name), 0, end)  # type: ignore[return-value]

    def _run_index(self, name: str, args: list[str]) -> None:
        with self._conn.doing(f"writing batch {name!r}"):
            self._index(keys=[self._keys.batch_slots(name)], args=[self._lua_keys, name, *args])

    def write(self, name: str, meta: Mapping[str, Any], order: Sequence[str], now: float) -> None:
        """The batch's metadata and its slot order, replacing an earlier order, in one
        transaction (first submitted: `now`, unless it was submitted before). Slots of an
        earlier order that this one drops take their jobs out of the batch's counts."""
        keys = self._keys
        dropped = sorted(set(self.order(name)) - set(order))
        for start in range(0, len(dropped), SLOTS_CHUNK):
            self._run_index(
                name, [x for slot in dropped[start : start + SLOTS_CHUNK] for x in (slot, "", "")]
            )
        with self._conn.doing(f"writing batch {name!r}"):
            pipe = self._conn.client.pipeline(transaction=True)
            pipe.zadd(keys.batches, {name: now}, nx=True)
            pipe.hsetnx(keys.batch(name), "created_at", json.dumps(now))
            pipe.hset(keys.batch(name), mapping={k: json.dumps(v) for k, v in meta.items()})
            pipe.delete(keys.batch_order(name))
            for start in range(0, len(order), ORDER_CHUNK):
                pipe.rpush(keys.batch_order(name), *order[start : start + ORDER_CHUNK])
            pipe.execute()
