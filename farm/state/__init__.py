"""Job state in Redis: the only wing that talks to Redis.

tracker.py       `Tracker`: records, state changes (one Lua script, fenced), leases, progress,
                 events, the batch index, the worker registry, queue depths, locks; every
                 Redis error becomes a `TransientError` naming what was being done
scripts.py       the Lua scripts the tracker runs, `TRANSITIONS` rendered into them
dependencies.py  jobs that wait for other jobs (a render chained to a fine-tune)
reconciler.py    the safety net for at-least-once delivery: lost messages, expired leases

May import: `farm.errors`, `farm.settings`, `farm.keys`, `farm.jobs`, `farm.queue`, redis.
"""
