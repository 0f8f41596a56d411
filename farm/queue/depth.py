"""How many messages wait in each Celery queue, read straight from Redis.

kombu's Redis transport with priority steps keeps one list per step and queue: the queue's own
name for step 0 and `name + '\\x06\\x16' + step` above (`RedisKeys.broker_queue`), so a queue's
depth is the sum over its ten lists. `farm workers` prints these, the dashboard shows them, and
each worker's metrics endpoint serves them as `farm_queue_depth{queue}` (what an autoscaler
reads).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from farm.queue.app import PRIORITY_STEPS


def queue_lengths(r: Any, keys: Any, queues: Iterable[str]) -> dict[str, dict[int, int]]:
    """Messages waiting per queue and kombu priority step, in one round trip."""
    names = sorted(set(queues))
    pipe = r.pipeline(transaction=False)
    for queue in names:
        for step in PRIORITY_STEPS:
            pipe.llen(keys.broker_queue(queue, step))
    sizes = iter(pipe.execute())
    return {q: {step: next(sizes) for step in PRIORITY_STEPS} for q in names}


def queue_depths(r: Any, keys: Any, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue, every priority sub-list counted, in one round trip."""
    return {q: sum(steps.values()) for q, steps in queue_lengths(r, keys, queues).items()}
