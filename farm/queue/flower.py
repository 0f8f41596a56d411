"""The farm's Celery app, for Celery's own tools: `celery -A farm.queue.flower flower --port=5555`.

Flower (and `celery -A farm.queue.flower events`, `inspect`) must see the broker exactly as the
workers do: the farm's Redis, its key prefix (`farm:celery:`, which kombu also puts on the
event channels), JSON only. A bare `celery --broker=redis://... flower` would look for queues
without the prefix and see none. Settings come from `FARM_*` as everywhere else (or the running
`farm up`). Needs the `flower` extra (`pip install 'render-farm[flower]'`); the client image
has it.
"""

from __future__ import annotations

from farm.queue.app import make_celery
from farm.settings import FarmSettings, resolve_settings

app = make_celery(resolve_settings(FarmSettings()))
