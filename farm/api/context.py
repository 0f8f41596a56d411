"""What every request of the app shares: the farm it serves, and a view of it per tenant.

The app holds one `Farm` (one Redis pool, one store client, one Celery producer pool), never
one per request. A request of tenant T submits through `TenantFarm(farm, T)`, which is the
farm itself but for its `tenant`: the one submit pipeline (`farm.submit.Submission`) writes
that tenant on every record it prepares, batches and retries included.

Where the farm's settings came from `farm up`'s state file (no `FARM_REDIS_URL`), a farm that
`farm up` restarted on a new port is found again: a request that finds Redis unreachable
re-reads the settings (`recover`), so the next one reaches the new farm instead of answering
"farm unavailable" for good.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from farm.api.auth import Principal
from farm.client import Farm
from farm.settings import FarmSettings, resolve_settings

log = logging.getLogger("farm.api")


class TenantFarm:
    """`farm` as seen by one tenant: the same parts, records written with `tenant`."""

    def __init__(self, farm: Farm, tenant: str) -> None:
        self._farm = farm
        self.tenant = tenant

    def __getattr__(self, name: str) -> Any:
        return getattr(self._farm, name)


API_REDIS_TIMEOUT = 10.0
"""Seconds a Redis call of the API may take (unless `FARM_REDIS_TIMEOUT` says): a hung Redis
makes a request fail with 503, never hang."""


def local_farm(settings: FarmSettings) -> Farm:
    """A farm over Redis and storage, whatever `FARM_API_URL` says (the API is that URL)."""
    update: dict[str, Any] = {"api_url": None, "api_token": None}
    if settings.redis_timeout is None:
        update["redis_timeout"] = API_REDIS_TIMEOUT
    return Farm(settings.model_copy(update=update))


@dataclass
class Context:
    """The app's state (`app.state.ctx`)."""

    base: FarmSettings
    """The settings the app was started with (before `farm up`'s state file was read)."""
    farm: Farm
    anonymous: Principal | None = None
    """Who a request without credentials is (`farm dashboard`: the operator), else 401."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _session_key: bytes | None = None

    @property
    def session_key(self) -> bytes:
        """The key dashboard sessions are signed with (in Redis: every replica shares it)."""
        if self._session_key is None:
            self._session_key = self.farm.tracker.tenants.session_key()
        return self._session_key

    @property
    def settings(self) -> FarmSettings:
        return self.farm.settings

    def recover(self) -> bool:
        """After Redis was unreachable: re-resolve the settings of a farm found through
        `farm up`'s state file; True if they changed (the farm was swapped)."""
        if self.base.redis_url:
            return False
        try:
            fresh = resolve_settings(self.base)
        except Exception as e:  # no farm running now: keep the old one and its 503s
            log.warning("no farm to reconnect to: %s", e)
            return False
        with self._lock:
            if fresh.redis_url == self.farm.settings.redis_url:
                return False
            old, self.farm = self.farm, local_farm(fresh)
        log.warning("the farm moved: now %s", self.farm.tracker.where)
        old.close()
        return True
