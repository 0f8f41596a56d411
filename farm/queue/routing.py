"""Queue names, and model affinity: send a render to the workers that already hold its model warm.

Loading a model is the costliest thing a worker does, so each worker advertises the models it
holds warm (its registry entry, `farm.state.registry`) and consumes their queues, `render.<slug>`
(`model_queue`), before the general `render` queue. The client sends a render for
model M to M's queue when some online worker consumes it, else to `render`:

    >>> Router(tracker.workers.consumed_queues).queue_for(Txt2Img(model="tiny", prompt="a fox"))
    'render.tiny'          # a worker holding `tiny` is online
    'render'               # none is

Ordering inside a worker: kombu's Redis transport with `queue_order_strategy: priority` sends
one `BRPOP` over its queues' keys, ordered priority step first, then queue in the order the
worker consumes them (kombu/transport/redis.py `_brpop_start`); Redis pops the first non-empty
key. So a worker takes the most urgent job it can see, and among jobs of one priority, its
warm models' jobs before the general queue's. Fine-tunes keep their own queue.

A job left in a model queue that no online worker consumes any more (its warm workers died or
stopped) is re-sent to `render` by the reconciler (`stranded`), and its record says so.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from collections.abc import Callable
from typing import Any

RENDER_QUEUE = "render"
"""The queue of txt2img, img2img, inpaint and style jobs."""

FINETUNE_QUEUE = "finetune"
"""The queue of fine-tunes: its own, so renders never wait behind a training run."""


def kind_queue(spec: Any) -> str:
    """The queue of a job's kind: `finetune` for fine-tunes, `render` for the rest (a render
    goes to its model's queue instead when a warm worker holds it: `Router`)."""
    return FINETUNE_QUEUE if spec.kind == "finetune" else RENDER_QUEUE


@functools.lru_cache(maxsize=4096)
def model_queue(ref: str) -> str:
    """The affinity queue of renders for model `ref`: `render.<slug>`, consumed first by the
    workers that hold `ref` warm (see `Router`). A ref that is not already a plain
    slug gets a short hash, so two refs never share a queue."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", ref.lower()).strip("-.")[:64]
    if slug != ref:
        slug = f"{slug}-{hashlib.sha256(ref.encode()).hexdigest()[:8]}"
    return f"{RENDER_QUEUE}.{slug}"


REFRESH_S = 2.0
"""How long a client trusts its view of which queues online workers consume."""


def is_model_queue(queue: str) -> bool:
    return queue.startswith(RENDER_QUEUE + ".")


class Router:
    """Chooses each job's queue: its model's affinity queue when a warm worker is online."""

    def __init__(self, consumed: Callable[[], set[str]], refresh_s: float = REFRESH_S) -> None:
        self.read_consumed = consumed
        """Reads the queues online workers consume (`WorkerRegistry.consumed_queues`)."""
        self.refresh_s = refresh_s
        self._consumed: set[str] = set()
        self._read_at = float("-inf")

    def consumed(self) -> set[str]:
        """Queues consumed by online workers: read at most every `refresh_s` (a batch of
        thousands of jobs reads the registry once, not once a job)."""
        if time.monotonic() - self._read_at > self.refresh_s:
            self._consumed = self.read_consumed()
            self._read_at = time.monotonic()
        return self._consumed

    def queue_for(self, spec: Any) -> str:
        queue = kind_queue(spec)
        if queue != RENDER_QUEUE:
            return queue  # fine-tunes: their own queue, whoever holds what
        warm = model_queue(spec.model)
        return warm if warm in self.consumed() else queue


def stranded(queue: str, consumed: set[str]) -> bool:
    """A model queue that no online worker consumes: its messages would wait forever."""
    return is_model_queue(queue) and queue not in consumed
