"""The Lua scripts `farm.state.tracker.Tracker` runs in Redis: each is one atomic step.

Every state change goes through `apply`, which checks it against `farm.jobs.state.TRANSITIONS`
(rendered into the script as a Lua table), and every change of a job's state, its creation
included, goes through `moved`, which keeps in the same step everything that follows from
states, so none of it ever needs a scan to read:

    counts        jobs per state (`RedisKeys.counts`)
    queued        the queued jobs, scored by when their message was last sent or seen
    running       the running jobs          waiting    the waiting jobs
    jobs          the live (not ended) jobs sig:<s>    the queued jobs of a batch signature
    a batch's     counts and images per state, first start, last success, failed jobs
                  (for a job that is the current job of one of the batch's slots)

The scripts build keys from the names in `K`, a JSON table the tracker renders from
`farm.keys.RedisKeys` (`lua_keys`): one Redis, not a Redis Cluster.
"""

from __future__ import annotations

import json

from farm.jobs.state import TERMINAL, TRANSITIONS
from farm.keys import RedisKeys


def lua_keys(keys: RedisKeys) -> str:
    """The key names every script takes as its `K` (one JSON argument)."""
    return json.dumps(
        {
            "job": keys.job(""),
            "sig": keys.signature(""),
            "events": keys.events,
            "jobs": keys.jobs,
            "counts": keys.counts,
            "queued": keys.queued,
            "running": keys.running,
            "waiting": keys.waiting,
            "queues": keys.queues,
            "seen": keys.reconciler_seen,
            "audited": keys.reconciler_audited,
            "batch": keys.batch(""),
            "batch_counts": keys.batch_counts("")[len(keys.batch("")) :],
            "batch_failed": keys.batch_failed("")[len(keys.batch("")) :],
        }
    )


def lua_tables() -> str:
    rows = ", ".join(
        f"{src.value} = {{{', '.join(f'{d.value} = true' for d in sorted(dsts))}}}"
        for src, dsts in TRANSITIONS.items()
    )
    return f"local ALLOWED = {{{rows}}}\nlocal TERMINAL = {{{', '.join(f'{t.value} = true' for t in sorted(TERMINAL))}}}\n"


# `moved(key, id, from, to, at)`: what follows from one job leaving state `from` (nil: it was
# just created) for `to`, at time `at` (a string: seconds since the epoch; for `to == queued`,
# when its message was sent). `batch_moved` is the batch's share, also used when a job joins
# or leaves a batch's slot (`INDEX_SLOTS`: `to` or `from` nil).
#
# The signature index holds exactly the queued jobs of each batch signature, most urgent
# first (higher priority, then older: each priority step weighs 10^8 s, and the score keeps
# sub-microsecond precision).
MOVED = (
    lua_tables()
    + """
local K

local function bump(hash, field, by)
  if by ~= 0 then redis.call('HINCRBY', hash, field, by) end
end

local function index_score(priority, created_at)
  return string.format('%.6f', (9 - tonumber(priority or '0')) * 1e8 + tonumber(created_at or '0'))
end

local function reindex(key, id, state)
  local sig = redis.call('HGET', key, 'signature')
  if not sig or sig == '' then return end
  if state == 'queued' then
    local p = redis.call('HMGET', key, 'priority', 'created_at')
    redis.call('ZADD', K.sig .. sig, index_score(p[1], p[2]), id)
  else
    redis.call('ZREM', K.sig .. sig, id)
  end
end

local function batch_moved(key, id, batch, from, to, started, finished)
  local counts = K.batch .. batch .. K.batch_counts
  local n = tonumber(redis.call('HGET', key, 'images') or '1')
  if from then
    bump(counts, from, -1)
    bump(counts, 'images:' .. from, -n)
    if from == 'failed' then redis.call('ZREM', K.batch .. batch .. K.batch_failed, id) end
  end
  if not to then return end
  bump(counts, to, 1)
  bump(counts, 'images:' .. to, n)
  if started and started ~= '' then
    local first = redis.call('HGET', counts, 'started_at')
    if not first or tonumber(started) < tonumber(first) then
      redis.call('HSET', counts, 'started_at', started)
    end
  end
  if to == 'succeeded' and finished and finished ~= '' then
    local last = redis.call('HGET', counts, 'finished_at')
    if not last or tonumber(finished) > tonumber(last) then
      redis.call('HSET', counts, 'finished_at', finished)
    end
  end
  if to == 'failed' then
    redis.call('ZADD', K.batch .. batch .. K.batch_failed, finished or '0', id)
  end
end

local function moved(key, id, from, to, at)
  if from then bump(K.counts, from, -1) end
  bump(K.counts, to, 1)
  if from == 'queued' then redis.call('ZREM', K.queued, id)
  elseif from == 'running' then redis.call('SREM', K.running, id)
  elseif from == 'waiting' then redis.call('SREM', K.waiting, id) end
  if to == 'queued' then redis.call('ZADD', K.queued, at, id)
  elseif to == 'running' then redis.call('SADD', K.running, id)
  elseif to == 'waiting' then redis.call('SADD', K.waiting, id)
  elseif TERMINAL[to] then redis.call('ZREM', K.jobs, id) end
  reindex(key, id, to)
  local batch = redis.call('HGET', key, 'batch')
  if batch and batch ~= '' then
    batch_moved(key, id, batch, from, to, to == 'running' and at or nil, at)
  end
end
"""
)

# `apply` makes every state change, for `TRANSITION` (one job) and `CLAIM` (several).
# It returns {status, state, token, attempt}: status is ok | missing | stale | illegal |
# unexpected (state not among the expected ones). `c` holds what the call shares: now, ttl,
# lease, worker, nonce, events maxlen.
APPLY = (
    MOVED
    + """
local function apply(id, to, token, expect, fields, c)
  local key = K.job .. id
  local cur = redis.call('HGET', key, 'state')
  if not cur then return {'missing', '', '', '0'} end
  local attempt = redis.call('HGET', key, 'attempt') or '0'
  local current_token = redis.call('HGET', key, 'token') or ''

  local function event(state)
    redis.call('XADD', K.events, 'MAXLEN', '~', c.maxlen, '*', 'job', id, 'state', state)
  end

  -- A claim (to == running, no token) may take over a running job whose lease ran out:
  -- the old attempt is handed back (running -> queued) before the new one starts.
  if to == 'running' and token == '' and cur == 'running' then
    local lease_until = tonumber(redis.call('HGET', key, 'lease_until') or '0')
    if lease_until < c.now then
      redis.call('HSET', key, 'state', 'queued', 'token', '')
      moved(key, id, 'running', 'queued', c.now_s)
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
    out_token = attempt .. ':' .. c.nonce
    redis.call('HSET', key, 'token', out_token, 'worker', c.worker, 'started_at', c.now_s,
               'lease_until', tostring(c.now + c.lease), 'step', '0', 'total', '0')
  elseif to == 'queued' then
    redis.call('HSET', key, 'token', '')
    out_token = ''
  end
  for k, v in pairs(fields) do redis.call('HSET', key, k, v) end
  if TERMINAL[to] then
    redis.call('HSET', key, 'finished_at', c.now_s)
    redis.call('EXPIRE', key, c.ttl)
  end
  moved(key, id, cur, to, to == 'queued' and (fields.enqueued_at or c.now_s) or c.now_s)
  event(to)
  return {'ok', to, out_token, attempt}
end

local function context(raw)
  local c = cjson.decode(raw)
  K = c.K
  c.now_s = c.now
  c.now = tonumber(c.now)
  return c
end
"""
)

# One state change of one job (KEYS: job; ARGV: to, token, expect, fields JSON, id, context).
TRANSITION = (
    APPLY
    + """
local c = context(ARGV[6])
return apply(ARGV[5], ARGV[1], ARGV[2], ARGV[3], cjson.decode(ARGV[4]), c)
"""
)

# Claim and read, in one step: the lead job a message names (as `TRANSITION` to running
# would), then queued jobs of its batch signature, most urgent first, up to n images in all
# (the lead's `images` each); or, with no lead (ARGV[1] ''), up to n jobs of signature
# ARGV[2]. Ids in the index that are no longer queued are dropped from it. ARGV: lead, the
# signature, n, context. Returns {{status, state, token, attempt, lead's record}} for a lead,
# then {id, token, attempt, record} per job gathered; records as HGETALL gives them.
CLAIM = (
    APPLY
    + """
local c = context(ARGV[4])
local lead, sig, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
if lead ~= '' then
  local r = apply(lead, 'running', '', '', {}, c)
  if r[1] ~= 'ok' then return {r} end
  local key = K.job .. lead
  r[5] = redis.call('HGETALL', key)
  out[1] = r
  local h = redis.call('HMGET', key, 'signature', 'images')
  sig = h[1] or ''
  n = math.floor(n / tonumber(h[2] or '1')) - 1
end
if sig == '' then return out end
while n > 0 do
  local popped = redis.call('ZPOPMIN', K.sig .. sig)
  if #popped == 0 then break end
  local id = popped[1]
  local r = apply(id, 'running', '', 'queued', {}, c)
  if r[1] == 'ok' then
    out[#out + 1] = {id, r[3], r[4], redis.call('HGETALL', K.job .. id)}
    n = n - 1
  end
end
return out
"""
)

# Heartbeat: renew the lease and record progress, if the token is still current.
# Returns {'ok', cancel_flag} or {'stale', state}.
HEARTBEAT = """
local key = KEYS[1]
local state = redis.call('HGET', key, 'state')
if state ~= 'running' or redis.call('HGET', key, 'token') ~= ARGV[1] then
  return {'stale', state or 'missing'}
end
redis.call('HSET', key, 'lease_until', ARGV[2], 'step', ARGV[3], 'total', ARGV[4])
if ARGV[5] then redis.call('HSET', key, 'loss', ARGV[5]) end
return {'ok', redis.call('HGET', key, 'cancel') or '0'}
"""

# Create records unless one with its id exists (ARGV: K, then one JSON array per record:
# [id, created_at, field, value, ...], every value a string). One call for a chunk of records:
# a round trip and a K decoded per chunk, not per job. Returns 1 per record created, else 0.
CREATE = (
    MOVED
    + """
K = cjson.decode(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local rec = cjson.decode(ARGV[i])
  local id, created_at = rec[1], rec[2]
  local key = K.job .. id
  if redis.call('EXISTS', key) == 1 then
    out[#out + 1] = 0
  else
    redis.call('HSET', key, unpack(rec, 3))
    redis.call('ZADD', K.jobs, created_at, id)
    local h = redis.call('HMGET', key, 'state', 'queue')
    if h[2] then redis.call('SADD', K.queues, h[2]) end
    moved(key, id, nil, h[1], created_at)
    redis.call('XADD', K.events, 'MAXLEN', '~', 100000, '*', 'job', id, 'state', h[1])
    out[#out + 1] = 1
  end
end
return out
"""
)

# Read fields of many job records (ARGV: the job key prefix, how many fields, the fields,
# then the ids). Returns each record's values in order, nil where a field or record is
# missing: one call a chunk, where a pipeline of HMGETs costs a command and a reply a job.
JOB_FIELDS = """
local n = tonumber(ARGV[2])
local out = {}
for i = 3 + n, #ARGV do
  local values = redis.call('HMGET', ARGV[1] .. ARGV[i], unpack(ARGV, 3, 2 + n))
  for j = 1, n do out[#out + 1] = values[j] end
end
return out
"""

# Point a batch's slots at their jobs (KEYS: the batch's slots hash; ARGV: K, the batch's
# name, then (slot, entry JSON with "job" its first key, job id) triples; an empty entry: the
# slot left the batch's order, its entry stays and its job no longer counts). A job counts in its batch's counts while it is the current job of one of
# its slots: a slot that gets a new job (a retry) takes its old job out of the counts, and a
# job that joins is counted in the state it is in now. Its record learns its batch and slot.
INDEX_SLOTS = (
    MOVED
    + """
K = cjson.decode(ARGV[1])
local name = ARGV[2]

local function count(id, slot, joins)
  local key = K.job .. id
  local h = redis.call('HMGET', key, 'state', 'batch', 'started_at', 'finished_at')
  if not h[1] then return end
  if joins then
    if h[2] == name then return end
    redis.call('HSET', key, 'batch', name, 'slot', slot)
    batch_moved(key, id, name, nil, h[1], h[3], h[4])
  elseif h[2] == name then
    batch_moved(key, id, name, h[1], nil)
    redis.call('HDEL', key, 'batch', 'slot')
  end
end

for i = 3, #ARGV, 3 do
  local slot, entry, job = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local old = redis.call('HGET', KEYS[1], slot)
  local old_job = old and string.match(old, '^{"job": "([^"]*)"')  -- always the first key
  if old_job and (entry == '' or old_job ~= job) then count(old_job, slot, false) end
  if entry ~= '' then
    redis.call('HSET', KEYS[1], slot, entry)
    count(job, slot, true)
  end
end
return 1
"""
)

# Take the job ids whose retry is due (KEYS: the retries sorted set; ARGV: now, how many):
# removed and returned in one step, so two reconcilers never both send one.
TAKE_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids > 0 then redis.call('ZREM', KEYS[1], unpack(ids)) end
return ids
"""
