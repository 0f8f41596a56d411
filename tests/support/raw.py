"""The Redis client under a `Farm` or a `Tracker`, for tests that look at, or tamper with, what
the farm wrote, as an operator with `redis-cli` would (farm code itself never reaches it)."""

from __future__ import annotations

from typing import Any

import redis


def raw(owner: Any) -> redis.Redis:
    tracker = getattr(owner, "tracker", owner)
    return tracker._r
