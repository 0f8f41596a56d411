"""The Lua scripts `farm.state.tracker.Tracker` runs in Redis: each is one atomic step.

Every state change goes through `apply`, which checks it against `farm.jobs.state.TRANSITIONS`
(rendered into the script as a Lua table) and keeps the per-signature index of queued jobs.
The scripts build job and index keys from their prefixes: one Redis, not a Redis Cluster.
"""

from __future__ import annotations

from farm.jobs.state import TERMINAL, TRANSITIONS


def _lua_table() -> str:
    rows = ", ".join(
        f"{src.value} = {{{', '.join(f'{d.value} = true' for d in sorted(dsts))}}}"
        for src, dsts in TRANSITIONS.items()
    )
    return f"local ALLOWED = {{{rows}}}\nlocal TERMINAL = {{{', '.join(f'{t.value} = true' for t in sorted(TERMINAL))}}}\n"


# The signature index (`RedisKeys.signature`) holds exactly the queued jobs of each batch
# signature, most urgent first (higher priority, then older: each priority step weighs 10^8 s,
# and the score keeps sub-microsecond precision): every script that moves a job into or out of
# `queued` updates it in the same atomic step.
INDEX = """
local function index_score(priority, created_at)
  return string.format('%.6f', (9 - tonumber(priority or '0')) * 1e8 + tonumber(created_at or '0'))
end

local function reindex(key, id, state, sig_prefix)
  local sig = redis.call('HGET', key, 'signature')
  if not sig or sig == '' then return end
  if state == 'queued' then
    local p = redis.call('HMGET', key, 'priority', 'created_at')
    redis.call('ZADD', sig_prefix .. sig, index_score(p[1], p[2]), id)
  else
    redis.call('ZREM', sig_prefix .. sig, id)
  end
end
"""

# `apply` makes every state change, for `TRANSITION` (one job) and `CLAIM_BATCH` (several).
# It returns {status, state, token, attempt}: status is ok | missing | stale | illegal |
# unexpected (state not among the expected ones). `c` holds what the call shares: now, ttl,
# lease, worker, nonce, events key, events maxlen, signature index prefix.
APPLY = (
    _lua_table()
    + INDEX
    + """
local function apply(key, id, to, token, expect, fields, c)
  local cur = redis.call('HGET', key, 'state')
  if not cur then return {'missing', '', '', '0'} end
  local attempt = redis.call('HGET', key, 'attempt') or '0'
  local current_token = redis.call('HGET', key, 'token') or ''

  local function event(state)
    redis.call('XADD', c.events, 'MAXLEN', '~', c.maxlen, '*', 'job', id, 'state', state)
  end

  -- A claim (to == running, no token) may take over a running job whose lease ran out:
  -- the old attempt is handed back (running -> queued) before the new one starts.
  if to == 'running' and token == '' and cur == 'running' then
    local lease_until = tonumber(redis.call('HGET', key, 'lease_until') or '0')
    if lease_until < c.now then
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
  reindex(key, id, to, c.sig_prefix)
  event(to)
  return {'ok', to, out_token, attempt}
end

local function context(now, ttl, lease, worker, nonce, events, maxlen, sig_prefix)
  return {now = tonumber(now), now_s = now, ttl = tonumber(ttl), lease = tonumber(lease),
          worker = worker, nonce = nonce, events = events, maxlen = tonumber(maxlen),
          sig_prefix = sig_prefix}
end
"""
)

# One state change of one job (KEYS: job, events).
TRANSITION = (
    APPLY
    + """
local c = context(ARGV[4], ARGV[5], ARGV[7], ARGV[8], ARGV[10], KEYS[2], ARGV[9], ARGV[12])
return apply(KEYS[1], ARGV[11], ARGV[1], ARGV[2], ARGV[3], cjson.decode(ARGV[6]), c)
"""
)

# Claim up to n queued jobs of one signature (KEYS: its index, events), most urgent first.
# Ids that are no longer queued are dropped from the index. Returns {id, token, attempt, ...}.
CLAIM_BATCH = (
    APPLY
    + """
local n, job_prefix = tonumber(ARGV[1]), ARGV[2]
local c = context(ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], KEYS[2], ARGV[8], ARGV[9])
local out, claimed = {}, 0
while claimed < n do
  local popped = redis.call('ZPOPMIN', KEYS[1])
  if #popped == 0 then break end
  local id = popped[1]
  local r = apply(job_prefix .. id, id, 'running', '', 'queued', {}, c)
  if r[1] == 'ok' then
    out[#out + 1], out[#out + 2], out[#out + 3] = id, r[3], r[4]
    claimed = claimed + 1
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

# Create a record unless one with this id exists (KEYS: job, jobs, events, and the job's
# signature index when it has one). Returns 1 if created, else 0.
CREATE = (
    INDEX
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
if KEYS[4] and redis.call('HGET', KEYS[1], 'state') == 'queued' then
  local p = redis.call('HMGET', KEYS[1], 'priority', 'created_at')
  redis.call('ZADD', KEYS[4], index_score(p[1], p[2]), ARGV[2])
end
local created = redis.call('HGET', KEYS[1], 'state')
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100000, '*', 'job', ARGV[2], 'state', created)
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
