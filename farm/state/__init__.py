"""Job state in Redis: the only wing that talks to Redis.

connection.py    the one Redis connection; `doing(what)` turns every Redis error into a
                 `TransientError` (or `FarmError`) naming what was being done; `Patience`
                 rides out a restart
tracker.py       `Tracker`: records, state changes (one Lua script, fenced), leases, progress,
                 events, counts, dependents, retries, queue depths; it holds the parts below
batch_index.py   the batch index: metadata, slot order, slots, counters, failed jobs
registry.py      the worker registry: `WorkerInfo` entries, who consumes which queues
tenants.py       API tokens (hashes only) and tenants: limits, a token bucket, what each owns
webhooks.py      webhook deliveries: the events stream's consumer group, due times, attempts
feed.py          following one job: events after an id, progress, previews (fenced)
inflight.py      what the reconciler must know: queued jobs by when their message was last
                 seen, an audit of the broker's lists, the lock for one pass (fenced writes)
scripts.py       the Lua scripts the tracker runs, `TRANSITIONS` rendered into them, and the
                 counters and indexes every state change keeps
dependencies.py  jobs that wait for other jobs (a render chained to a fine-tune)
reconciler.py    the safety net for at-least-once delivery: lost messages, expired leases,
                 retries whose backoff ran out

Nothing outside this wing touches a Redis client. May import: `farm.errors`, `farm.settings`,
`farm.keys`, `farm.jobs`, `farm.queue`, redis.
"""
