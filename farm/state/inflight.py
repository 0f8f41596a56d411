"""What is in flight, as the reconciler must know it: which queued jobs still have a message,
which jobs run or wait, and a lock that makes one pass at a time.

Celery on Redis delivers at least once, but a message can still vanish: a worker that dies
between kombu's BRPOP and its move to `unacked` takes it along (celery#7950), a submit can die
between writing records and sending messages, a Redis with `appendfsync everysec` can lose the
last second, a person can delete a list. A queued job whose message is gone waits forever.

The reconciler used to re-send every job queued longer than `FARM_REQUEUE_AFTER`, which cannot
tell a lost message from one waiting its turn behind a backlog: behind 200,000 queued jobs it
added 200,000 messages a pass. Instead:

1. The farm keeps its own record: `RedisKeys.queued`, the queued jobs scored by when a message
   for them was last sent (the state scripts keep it, `farm.state.scripts.moved`).
2. Only jobs unseen for `requeue_after` are suspects. When there are any, the pass audits the
   broker itself, in chunks: kombu keeps each queue's messages in one Redis list per priority
   step (`RedisKeys.broker_queue`; LPUSH to publish, BRPOP to consume) and the delivered,
   unacknowledged ones in a hash (`RedisKeys.broker_unacked`). Each message names its job
   (Celery's `argsrepr` header, which `farm.queue.app.enqueue` writes); a suspect whose message
   is found is marked seen, in Redis, by the audit script itself (`scripts.AUDIT`), so nothing
   of the backlog is copied out of Redis.
3. The lists are read from the head (newest) to the tail while workers pop at the tail, so an
   index only ever grows: no message present through the audit is missed, and the hash is read
   after the lists, so a message popped meanwhile is found there (or its job is claimed). Only
   one popped at the very instant between the two may be taken for lost, and that costs one
   duplicate message, which its job's claim makes harmless.
4. The suspects still unseen are re-sent (`scripts.RESEND`, which also takes them off the
   suspects atomically, so no job is re-sent twice for one loss).

One pass at a time: the lock (`RedisKeys.reconciler_lock`, `<owner>:<epoch>`) is held for the
whole pass and renewed as it goes, and every write of the pass checks in its own atomic step
that the lock is still the pass's (fencing): a pass that stalled past its lease and lost the
lock stops at its next write instead of racing the pass that took over.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from farm.errors import FarmError
from farm.keys import PRIORITY_STEPS, RedisKeys
from farm.queue.routing import RENDER_QUEUE
from farm.state import scripts
from farm.state.connection import Connection

CHUNK = 1000
"""Messages, ids or jobs handled per script call or round trip: a bound on how long one call
holds Redis (a few milliseconds) and on what a pass holds in memory."""

MIN_LEASE = 5.0
"""The shortest the reconciler's lock lasts unless renewed (renewed at every chunk of a pass):
a pass that stalls longer loses it. Three intervals, when that is longer."""

_MESSAGE_JOB = re.compile(r"\"argsrepr\": \"\['([^']+)'\]\"")
"""Python's reading of a message's job id (`scripts._MESSAGE_JOB` is the script's)."""


class LostTurn(FarmError):
    """The reconciler's lock passed to another process while this one's pass ran."""


@dataclass(frozen=True, slots=True)
class Turn:
    """The reconciler's lock as one pass holds it (the empty turn: an unfenced pass)."""

    value: str = ""
    lock: str = ""
    lease: float = MIN_LEASE


UNFENCED = Turn()


class InFlight:
    """The reconciler's reads and fenced writes (see the module docstring)."""

    def __init__(self, conn: Connection, keys: RedisKeys, lua_keys: str) -> None:
        self._conn = conn
        self._r = conn.client
        self._keys = keys
        self._lua_keys = lua_keys
        self._take = self._r.register_script(scripts.TAKE_TURN)
        self._hold = self._r.register_script(scripts.HOLD_TURN)
        self._audit = self._r.register_script(scripts.AUDIT)
        self._seen = self._r.register_script(scripts.SEEN)
        self._resend = self._r.register_script(scripts.RESEND)
        self._move = self._r.register_script(scripts.MOVE_STRANDED)
        self._sweep = self._r.register_script(scripts.SWEEP)

    # ------------------------------------------------------------------ the lock

    def take_turn(self, owner: str, lease: float = MIN_LEASE) -> Turn | None:
        """The lock for one pass, held `lease` seconds unless renewed, unless another process
        holds it."""
        with self._conn.doing("taking the reconciler's turn"):
            value = self._take(
                keys=[self._keys.reconciler_lock, self._keys.reconciler_epoch],
                args=[owner, _ms(lease)],
            )
        return Turn(value, self._keys.reconciler_lock, lease) if value else None

    def renew(self, turn: Turn) -> None:
        """Keep the lock for its lease again; `LostTurn` if it is no longer ours."""
        if turn.lock:
            with self._conn.doing("renewing the reconciler's turn"):
                held = self._hold(keys=[turn.lock], args=[turn.value, _ms(turn.lease)])
            if not held:
                raise LostTurn(f"the reconciler's lock is no longer {turn.value!r}")

    def end_turn(self, turn: Turn, keep: float) -> None:
        """Hold the lock `keep` seconds more (the rest of the interval: one pass per interval
        across the farm), or let it go now."""
        if turn.lock:
            with self._conn.doing("ending the reconciler's turn"):
                self._hold(keys=[turn.lock], args=[turn.value, _ms(keep) if keep > 0 else 0])

    # ------------------------------------------------------------------ reads

    def running(self) -> list[str]:
        """The running jobs (a few per worker)."""
        with self._conn.doing("listing running jobs"):
            return sorted(self._r.smembers(self._keys.running))  # type: ignore[arg-type]

    def waiting(self) -> Iterator[list[str]]:
        """The waiting jobs, a chunk at a time."""
        cursor = 0
        while True:
            with self._conn.doing("listing waiting jobs"):
                reply: Any = self._r.sscan(self._keys.waiting, cursor, count=CHUNK)
            cursor, ids = reply
            if ids:
                yield sorted(ids)
            if not cursor:
                return

    def suspects(self, cutoff: float, n: int = CHUNK) -> list[str]:
        """Up to `n` queued jobs whose message was last sent or seen before `cutoff`."""
        with self._conn.doing("reading the queued jobs"):
            return self._r.zrangebyscore(self._keys.queued, "-inf", f"({cutoff!r}", 0, n)  # type: ignore[return-value]

    def queues(self) -> list[str]:
        """Every queue a job was created for."""
        with self._conn.doing("listing queues"):
            return sorted(self._r.smembers(self._keys.queues))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ fenced writes

    def audit(self, turn: Turn, queues: Sequence[str], at: float) -> int:
        """Mark seen at `at` every queued job with a message in the broker: its queues' lists
        (every priority step, head to tail, in chunks), then the unacknowledged hash. How
        many messages were read."""
        read = 0
        for queue in queues:
            for step in PRIORITY_STEPS:
                key = self._keys.broker_queue(queue, step)
                start = 0
                while True:
                    with self._conn.doing("auditing the broker's queues"):
                        n = self._audit(
                            keys=[key], args=[*self._fence(turn), start, start + CHUNK - 1, at]
                        )
                    if n is None:
                        raise LostTurn("the reconciler's lock passed on during an audit")
                    read += n
                    if n < CHUNK:
                        break
                    start += CHUNK
                    self.renew(turn)
        cursor = 0
        while True:
            with self._conn.doing("auditing the broker's unacknowledged messages"):
                reply: Any = self._r.hscan(self._keys.broker_unacked, cursor, count=CHUNK)
                cursor, entries = reply
                ids = [m.group(1) for v in entries.values() if (m := _MESSAGE_JOB.search(v))]
                if ids and self._seen(args=[*self._fence(turn), at, *ids]) is None:
                    raise LostTurn("the reconciler's lock passed on during an audit")
            read += len(entries)
            if not cursor:
                return read

    def resend(
        self, turn: Turn, ids: Sequence[str], cutoff: float, now: float, stranded: set[str]
    ) -> list[tuple[str, str, int]]:
        """Of `ids`, the queued jobs still unseen since `cutoff`, marked sent at `now`: their
        (id, queue, priority) to send, each once however many passes race."""
        with self._conn.doing("re-sending lost messages"):
            flat = self._resend(
                args=[
                    *self._fence(turn),
                    repr(cutoff),
                    repr(now),
                    json.dumps(sorted(stranded)),
                    RENDER_QUEUE,
                    *ids,
                ]
            )
        if flat is None:
            raise LostTurn("the reconciler's lock passed on before a re-send")
        return [(flat[i], flat[i + 1], int(flat[i + 2])) for i in range(0, len(flat), 3)]

    def move_stranded(self, turn: Turn, queue: str, to: str) -> list[str]:
        """Move every message of model queue `queue` (no online worker consumes it) to `to`,
        oldest first, each priority step to the same step; the queued jobs moved. Their
        messages move, so none is added."""
        moved_ids: list[str] = []
        for step in PRIORITY_STEPS:
            keys = [self._keys.broker_queue(queue, step), self._keys.broker_queue(to, step)]
            while True:
                with self._conn.doing(f"moving messages from {queue} to {to}"):
                    out = self._move(keys=keys, args=[*self._fence(turn), CHUNK, queue, to])
                if out is None:
                    raise LostTurn("the reconciler's lock passed on while moving messages")
                moved, *ids = out
                moved_ids += ids
                if moved < CHUNK:
                    break
                self.renew(turn)
        return moved_ids

    def sweep(self, turn: Turn, n: int = CHUNK) -> int:
        """The next `n` ids of the live index whose record is gone or ended leave it (a
        bounded walk that goes on where the last pass stopped); how many left."""
        with self._conn.doing("sweeping the live index"):
            gone = self._sweep(keys=[self._keys.reconciler_cursor], args=[*self._fence(turn), n])
        if gone is None:
            raise LostTurn("the reconciler's lock passed on before a sweep")
        return int(gone)

    def _fence(self, turn: Turn) -> list[Any]:
        return [self._lua_keys, turn.lock, turn.value]


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
