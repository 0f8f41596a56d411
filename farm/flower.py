"""The farm's Celery app for Flower: `celery -A farm.flower flower --port=5555`.

Flower must talk to the broker exactly as the farm does: its Redis, its `farm:celery:` key
prefix (`broker_transport_options["global_keyprefix"]`), JSON only. A bare
`celery --broker=redis://... flower` would look for queues without the prefix and see none, so
Flower loads this module, which builds the app from the same `FARM_*` settings as the workers.
Needs the `flower` extra (`pip install 'render-farm[flower]'`); the client image has it.
"""

from __future__ import annotations

from farm.client import resolve_settings
from farm.queue import make_celery
from farm.settings import FarmSettings

app = make_celery(resolve_settings(FarmSettings()))
