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
   for them was last sent (the state scripts keep its members, `farm.state.scripts.MOVED`).
2. Jobs sent longer than `requeue_after` ago are overdue. When there are any, and the last
   audit is as old, the pass audits the broker itself, in windows: kombu keeps each queue's
   messages in one Redis list per priority step (`RedisKeys.broker_queue`; LPUSH to publish,
   BRPOP to consume) and the delivered, unacknowledged ones in a hash
   (`RedisKeys.broker_unacked`). Each message names its job (Celery's `argsrepr` header, which
   `farm.queue.app.enqueue` writes); the audit script itself gathers those jobs into a set in
   Redis (`RedisKeys.reconciler_seen`, `AUDIT`), so nothing of the backlog is copied out of
   Redis, and a million messages cost a million set insertions, not re-sorting a million
   jobs.
3. The lists are read in windows from the head (newest) towards the tail while workers pop at
   the tail: a message's index counted from the head only grows while it waits (a push at
   the head moves it up, a pop at the tail not at all), so no window is overtaken and none
   present through the audit is missed (`_audit_list`). The hash is read after the lists, so a
   message popped meanwhile is found there (or its job is claimed, and no longer queued).
   Only one caught between the two at that very instant (or restored by kombu just then) may
   be taken for lost, and that costs one duplicate message, which its job's claim makes
   harmless.
4. The overdue jobs not seen are re-sent (`RESEND`, which marks each sent now in the same
   step, so no job is re-sent twice for one loss), and the audit's time is noted: the next is
   due `requeue_after` later.

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
from farm.state.connection import Connection
from farm.state.scripts import lua_tables

CHUNK = 1000
"""Messages, ids or jobs handled per script call or round trip: a bound on how long one call
holds Redis (a few milliseconds) and on what a pass holds in memory."""

MAX_WINDOW = 5000
"""The most messages one audit call reads (deep in a long list, where the walk to them costs
more than reading them). Larger windows cost more per message (the script's table of them
grows large): measured, 5,000 does best at a million messages."""

MIN_LEASE = 5.0
"""The shortest the reconciler's lock lasts unless renewed (renewed at every chunk of a pass):
a pass that stalls longer loses it. Three intervals, when that is longer."""

_JOB_IN_MESSAGE = re.compile(r"\"argsrepr\": \"\['([^']+)'\]\"")
"""Python's reading of a message's job id (`_MESSAGE_JOB` is the scripts')."""


# ---------------------------------------------------------------------------- scripts
# Every write of a reconciler's pass checks, in the same step, that its process still holds
# the lock, and renews it (`FENCED`: ARGV lock key, value and lease in ms after K; an empty key
# means an unfenced, one-off pass).

FENCED = """
local K = cjson.decode(ARGV[1])
if ARGV[2] ~= '' then
  if redis.call('GET', ARGV[2]) ~= ARGV[3] then return false end
  redis.call('PEXPIRE', ARGV[2], ARGV[4])
end
"""
"""The head of every fenced script (ARGV: K, lock key, its value, its lease in ms, ...): false
when the lock is no longer the pass's, else the lock is renewed."""

# Take the reconciler's lock unless someone holds it (KEYS: lock, epoch; ARGV: owner, ms):
# its value `<owner>:<epoch>`, or false.
TAKE_TURN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local value = ARGV[1] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""

# Keep (ARGV[2] > 0: for that many ms more) or drop the lock, if it is still ours (KEYS: lock;
# ARGV: value, ms). 1 if it was ours.
HOLD_TURN = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2])
else redis.call('DEL', KEYS[1]) end
return 1
"""

# The job id of one of `farm.queue.app.enqueue`'s messages: Celery's `argsrepr` header,
# found with plain searches (a pattern match costs three times as much over a message).
_MESSAGE_JOB = r"""
local function message_job(m)
  local at = string.find(m, '"argsrepr": "[\'', 1, true)
  if not at then return nil end
  local stop = string.find(m, "'", at + 15, true)
  return stop and string.sub(m, at + 15, stop - 1)
end

local function seen(id)
  redis.call('SADD', K.seen, id)
end
"""

# Audit one window of a broker list (KEYS: the list; ARGV: fence, start, count): the job of
# every message there joins the audit's set of jobs seen (`RedisKeys.reconciler_seen`). The
# number of messages read.
AUDIT = (
    FENCED
    + _MESSAGE_JOB
    + """
local start = tonumber(ARGV[5])
local messages = redis.call('LRANGE', KEYS[1], start, start + tonumber(ARGV[6]) - 1)
for _, m in ipairs(messages) do
  local id = message_job(m)
  if id then seen(id) end
end
return #messages
"""
)

# Add jobs to the audit's set of jobs seen (ARGV: fence, ids...): those of unacknowledged
# messages.
SEEN = (
    FENCED
    + _MESSAGE_JOB
    + """
for i = 5, #ARGV do seen(ARGV[i]) end
return #ARGV - 4
"""
)

# Start (ARGV[5] == '') or end an audit (ARGV: fence, the pass's time): its set of jobs seen
# emptied; at its end, its time noted (`RedisKeys.reconciler_audited`).
AUDIT_BOUNDS = (
    FENCED
    + """
redis.call('DEL', K.seen)
if ARGV[5] ~= '' then redis.call('SET', K.audited, ARGV[5]) end
return 1
"""
)

# Re-send: of the queued jobs at ranks lo..hi (by when their message was last sent), those
# sent before `cutoff` whose message the audit did not see are marked sent now, and sent to
# their queue, or to `render` when theirs is stranded (their record says so).
# ARGV: fence, cutoff, now, stranded queues (JSON list), render, lo, hi.
# Returns {id, queue, priority, ...}.
RESEND = (
    FENCED
    + """
local cutoff, now, render = tonumber(ARGV[5]), ARGV[6], ARGV[8]
local stranded = {}
for _, q in ipairs(cjson.decode(ARGV[7])) do stranded[q] = true end
local out = {}
local window = redis.call('ZRANGE', K.queued, ARGV[9], ARGV[10], 'WITHSCORES')
for i = 1, #window, 2 do
  local id, score = window[i], tonumber(window[i + 1])
  if score < cutoff and redis.call('SISMEMBER', K.seen, id) == 0 then
    local key = K.job .. id
    local h = redis.call('HMGET', key, 'queue', 'priority')
    local queue = h[1] or render
    if stranded[queue] then
      queue = render
      redis.call('HSET', key, 'queue', render)
    end
    redis.call('HSET', key, 'enqueued_at', now)
    redis.call('ZADD', K.queued, now, id)
    out[#out + 1], out[#out + 2], out[#out + 3] = id, queue, h[2] or '0'
  end
end
return out
"""
)

# Move up to n messages, oldest first, from a stranded model queue's list to `render`'s at the
# same priority step (KEYS: from, to; ARGV: fence, n, from queue, render). The jobs'
# records say `render` from now on. Returns {messages moved, ids of queued jobs moved...}.
MOVE_STRANDED = (
    FENCED
    + _MESSAGE_JOB
    + """
local out, moved = {}, 0
for _ = 1, tonumber(ARGV[5]) do
  local m = redis.call('RPOPLPUSH', KEYS[1], KEYS[2])
  if not m then break end
  moved = moved + 1
  local id = message_job(m)
  if id then
    local key = K.job .. id
    local h = redis.call('HMGET', key, 'state', 'queue')
    if h[2] == ARGV[6] then redis.call('HSET', key, 'queue', ARGV[7]) end
    if h[1] == 'queued' then out[#out + 1] = id end
  end
end
table.insert(out, 1, moved)
return out
"""
)

# Sweep the next n ids of the live index (KEYS: cursor; ARGV: fence, n): those whose
# record is gone or ended leave it; the others are put in the index of their state and their
# queue among the audited ones, should a client older than these indexes have written them.
# Returns how many left.
SWEEP = (
    FENCED
    + lua_tables()
    + """
local n = tonumber(ARGV[5])
local start = tonumber(redis.call('GET', KEYS[1]) or '0')
local ids = redis.call('ZRANGE', K.jobs, start, start + n - 1)
local gone = 0
for _, id in ipairs(ids) do
  local h = redis.call('HMGET', K.job .. id, 'state', 'queue', 'enqueued_at', 'created_at')
  local state = h[1]
  if not state or TERMINAL[state] then
    redis.call('ZREM', K.jobs, id)
    gone = gone + 1
  elseif state == 'queued' then
    if not redis.call('ZSCORE', K.queued, id) then
      redis.call('ZADD', K.queued, h[3] or h[4] or '0', id)
    end
  elseif state == 'running' then redis.call('SADD', K.running, id)
  elseif state == 'waiting' then redis.call('SADD', K.waiting, id) end
  if h[2] and not TERMINAL[state or 'failed'] then redis.call('SADD', K.queues, h[2]) end
end
if #ids < n then redis.call('SET', KEYS[1], 0) else redis.call('SET', KEYS[1], start + n - gone) end
return gone
"""
)


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
        self._take = self._r.register_script(TAKE_TURN)
        self._hold = self._r.register_script(HOLD_TURN)
        self._audit = self._r.register_script(AUDIT)
        self._seen = self._r.register_script(SEEN)
        self._audit_bounds = self._r.register_script(AUDIT_BOUNDS)
        self._resend = self._r.register_script(RESEND)
        self._move = self._r.register_script(MOVE_STRANDED)
        self._sweep = self._r.register_script(SWEEP)

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

    def overdue(self, cutoff: float) -> int:
        """How many queued jobs had their message last sent before `cutoff` (O(log n))."""
        with self._conn.doing("reading the queued jobs"):
            return int(self._r.zcount(self._keys.queued, "-inf", f"({cutoff!r}"))

    def audited_at(self) -> float | None:
        """When the last audit of the broker began, if one ever finished."""
        with self._conn.doing("reading the reconciler's state"):
            value = self._r.get(self._keys.reconciler_audited)
        return float(value) if value else None

    def queues(self) -> list[str]:
        """Every queue a job was created for."""
        with self._conn.doing("listing queues"):
            return sorted(self._r.smembers(self._keys.queues))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ fenced writes

    def audit(self, turn: Turn, queues: Sequence[str]) -> int:
        """Gather the jobs with a message in the broker into the audit's set of jobs seen:
        its queues' lists (every priority step, in windows), then the unacknowledged hash.
        How many messages were read. `end_audit` empties the set."""
        self._bounds(turn, "")
        read = 0
        for queue in queues:
            for step in PRIORITY_STEPS:
                read += self._audit_list(turn, self._keys.broker_queue(queue, step))
        cursor = 0
        while True:
            with self._conn.doing("auditing the broker's unacknowledged messages"):
                reply: Any = self._r.hscan(self._keys.broker_unacked, cursor, count=CHUNK)
                cursor, entries = reply
                ids = [m.group(1) for v in entries.values() if (m := _JOB_IN_MESSAGE.search(v))]
                if ids and self._seen(args=[*self._fence(turn), *ids]) is None:
                    raise LostTurn("the reconciler's lock passed on during an audit")
            read += len(entries)
            if not cursor:
                return read

    def end_audit(self, turn: Turn, now: float) -> None:
        """The audit's set emptied, and its time noted (`audited_at`)."""
        self._bounds(turn, repr(now))

    def _bounds(self, turn: Turn, now: str) -> None:
        with self._conn.doing("auditing the broker's queues"):
            if self._audit_bounds(args=[*self._fence(turn), now]) is None:
                raise LostTurn("the reconciler's lock passed on during an audit")

    def _audit_list(self, turn: Turn, key: str) -> int:
        """Audit one list in windows from the head (the newest) on. Consumers pop at the tail
        and publishers push at the head, so a message's index only grows while it waits: the
        windows move up through the indices and are never overtaken, and none present through
        the audit is missed.

        Redis walks a list from its head to a window's start (in Redis 6.2 even for negative
        indices), so windows grow with their depth (`_window`): a million messages cost about
        10 s of Redis' time in all (`bench/backlog.py`), in calls of milliseconds to some tens
        of them, once per `requeue_after`."""
        read, start = 0, 0
        while True:
            count = _window(start)
            with self._conn.doing("auditing the broker's queues"):
                n = self._audit(keys=[key], args=[*self._fence(turn), start, count])
            if n is None:
                raise LostTurn("the reconciler's lock passed on during an audit")
            read += n
            if n < count:
                return read
            start += count

    def lost(
        self, turn: Turn, cutoff: float, now: float, stranded: set[str]
    ) -> Iterator[list[tuple[str, str, int]]]:
        """After an audit: the queued jobs sent before `cutoff` whose message it did not see,
        marked sent at `now`, a chunk at a time: their (id, queue, priority) to send again,
        each once however many passes race (`RESEND`).

        The queued jobs are walked by rank from the newest overdue down, so a job re-sent
        (moved to the top) or claimed meanwhile never makes one below it be skipped."""
        hi = self.overdue(cutoff) - 1
        while hi >= 0:
            lo = max(0, hi - CHUNK + 1)
            with self._conn.doing("re-sending lost messages"):
                flat = self._resend(
                    args=[
                        *self._fence(turn),
                        repr(cutoff),
                        repr(now),
                        json.dumps(sorted(stranded)),
                        RENDER_QUEUE,
                        lo,
                        hi,
                    ]
                )
            if flat is None:
                raise LostTurn("the reconciler's lock passed on before a re-send")
            yield [(flat[i], flat[i + 1], int(flat[i + 2])) for i in range(0, len(flat), 3)]
            hi = lo - 1

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
        """The head of a fenced script's arguments: it checks the lock and renews it."""
        return [self._lua_keys, turn.lock, turn.value, _ms(turn.lease)]


def _window(offset: int) -> int:
    """Messages an audit reads in one call at depth `offset`: more the deeper the window,
    for the walk to it costs about one message read per 200 steps, within `CHUNK` and
    `MAX_WINDOW`, so that a call holds Redis for milliseconds (some tens a million deep)."""
    return min(MAX_WINDOW, max(CHUNK, offset // 200))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
