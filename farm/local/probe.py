"""`python -m farm.local.probe`: exit 0 when this container's farm Redis answers, else 1.

The worker pod's readiness probe (infra/k8s/worker.yaml): a worker that cannot reach Redis can
neither take nor finish a job. It reads the same `FARM_*` settings as the worker, prints one
line on failure (never the URL: it may hold a password) and exits within `TIMEOUT` seconds.
"""

from __future__ import annotations

import sys

from farm.errors import FarmError
from farm.settings import FarmSettings
from farm.state.connection import Connection
from farm.state.tracker import Tracker

TIMEOUT = 3.0
"""Seconds to connect and get an answer."""


def main() -> int:
    settings = FarmSettings()
    if not settings.redis_url:
        print("farm probe: FARM_REDIS_URL is not set", file=sys.stderr)
        return 1
    ca = str(settings.redis_ca_file) if settings.redis_ca_file else None
    tracker = Tracker(Connection.from_url(settings.redis_url, ca, timeout=TIMEOUT))
    try:
        tracker.ping()
    except FarmError as e:  # the message names host:port, never the URL's password
        print(f"farm probe: redis did not answer: {e}", file=sys.stderr)
        return 1
    finally:
        tracker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
