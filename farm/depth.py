"""How many messages wait in each Celery queue, read straight from Redis.

kombu's Redis transport with priority steps keeps one list per step and queue: the queue's own
name for step 0 and `name + '\\x06\\x16' + step` above (`RedisKeys.celery_queue`), so a queue's
depth is the sum over its ten lists. `farm workers` prints these, and each worker's metrics
endpoint serves them as `farm_queue_depth{queue}` (what an autoscaler reads).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from farm.queue import PRIORITY_STEPS


def queue_depths(r: Any, keys: Any, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue, every priority sub-list counted, in one round trip."""
    names = sorted(set(queues))
    pipe = r.pipeline(transaction=False)
    for queue in names:
        for step in PRIORITY_STEPS:
            pipe.llen(keys.celery_queue(queue, step))
    sizes = pipe.execute()
    n = len(PRIORITY_STEPS)
    return {q: sum(sizes[i * n : (i + 1) * n]) for i, q in enumerate(names)}
