"""`python -m farm.local.probe`: exit 0 when this container's farm Redis answers, else 1.

The worker pod's readiness probe (infra/k8s/worker.yaml): a worker that cannot reach Redis can
neither take nor finish a job. It reads the same `FARM_*` settings as the worker, prints one
line on failure (never the URL: it may hold a password) and exits within `TIMEOUT` seconds.
"""

from __future__ import annotations

import sys

import redis

from farm.settings import FarmSettings

TIMEOUT = 3.0
"""Seconds to connect and get an answer."""


def main() -> int:
    settings = FarmSettings()
    if not settings.redis_url:
        print("farm probe: FARM_REDIS_URL is not set", file=sys.stderr)
        return 1
    ca = str(settings.redis_ca_file) if settings.redis_ca_file else None
    tls = {"ssl_ca_certs": ca} if settings.redis_url.startswith("rediss://") else {}
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, **tls
    )
    try:
        client.ping()
    except redis.RedisError as e:
        print(f"farm probe: redis did not answer: {type(e).__name__}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
