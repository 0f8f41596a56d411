"""The state wing's one Redis connection, and the one place Redis errors are mapped.

Every Redis call the farm makes runs inside `Connection.doing(what)`, which turns redis-py's
exceptions into the farm's own, naming what was being done and where, never the password:

    TransientError   the server is down, unreachable, loading its data, or refusing writes
                     at its memory limit: a retry (or `Patience`) may get through
    FarmError        anything else the server refused (a wrong password, a bad command)

`Patience` rides out a Redis that restarts under a waiting client (`farm wait`,
`farm batch wait`, `--watch`, the SDK's `wait`, the dashboard): it retries with backoff for
`FARM_RECONNECT_SECONDS`, telling the caller once per outage, then gives up with the error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from farm.errors import FarmError, TransientError

log = logging.getLogger("farm.state")

T = TypeVar("T")

_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)
"""Down, unreachable, or still loading its AOF (`BusyLoadingError` is a `ConnectionError`)."""


_OOM = "OOM command not allowed"
"""What Redis answers a write past its `maxmemory` (with `noeviction`)."""


class Connection:
    """One redis-py client (a thread-safe pool) and where it points, for messages."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        """The raw client: for the state wing's own modules only."""
        kwargs = client.connection_pool.connection_kwargs
        self.where = kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        """`host:port` (or the socket path): never the URL, which may hold a password."""

    @classmethod
    def from_url(
        cls, url: str, ca_file: str | None = None, *, timeout: float | None = None
    ) -> Connection:
        """`redis://` or `rediss://` (TLS, the server verified against `ca_file` or the
        system's CAs); a password in the URL. With `timeout`, every call (connecting too) gives
        up after that many seconds and is tried once (a probe's client)."""
        options: dict[str, Any] = (
            {"ssl_cert_reqs": "required", "ssl_ca_certs": ca_file}
            if url.startswith("rediss://")
            else {}
        )
        if timeout is not None:
            options |= {
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                "retry": Retry(NoBackoff(), 0),
            }
        else:
            options |= {"retry_on_timeout": True}
        return cls(
            redis.Redis.from_url(
                url,
                decode_responses=True,
                health_check_interval=10,
                socket_keepalive=True,
                **options,
            )
        )

    @contextmanager
    def doing(self, what: str, job_id: str | None = None) -> Iterator[None]:
        """Run Redis calls, raising the farm's errors for redis-py's (see the module doc)."""
        try:
            yield
        except redis.AuthenticationError as e:
            raise FarmError(f"Redis at {self.where} refused the password while {what}: {e}") from e
        except _UNREACHABLE as e:
            raise TransientError(
                f"Redis unavailable at {self.where} while {what}: {e}", job_id=job_id
            ) from e
        except redis.ResponseError as e:
            text = str(e)
            # `-OOM ...`: redis-py makes it an OutOfMemoryError without the code; from inside
            # a script (a pipeline's EVALSHA) it comes wrapped in a plain ResponseError.
            if isinstance(e, redis.exceptions.OutOfMemoryError) or _OOM in text:
                raise TransientError(
                    f"Redis at {self.where} is at its memory limit (the server's maxmemory) and "
                    f"refused a write while {what}: OOM {text[text.find(_OOM[4:]) :]}",
                    job_id=job_id,
                ) from e
            if text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
                raise FarmError(f"Redis at {self.where} refused access while {what}: {text}") from e
            if text.startswith(("READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN")):
                raise TransientError(
                    f"Redis at {self.where} cannot take writes now while {what}: {text}",
                    job_id=job_id,
                ) from e
            raise FarmError(f"Redis at {self.where} refused a command while {what}: {text}") from e

    def close(self) -> None:
        self.client.close()


class Patience:
    """Retries a call while Redis is unavailable, for up to `seconds` in a row.

        >>> patience = Patience(180, on_wait=lambda why: print("Redis unavailable, retrying…"))
        >>> states = patience.run(tracker.states, ids)

    Backoff grows from 0.2 s to 5 s. `on_wait(message)` is called once when an outage
    begins; `on_back()` once when a call succeeds again after one.
    """

    def __init__(
        self,
        seconds: float,
        on_wait: Callable[[str], None] | None = None,
        on_back: Callable[[], None] | None = None,
    ) -> None:
        self.seconds = seconds
        self.on_wait = on_wait
        self.on_back = on_back
        self._since: float | None = None

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        delay = 0.2
        while True:
            try:
                out = fn(*args, **kwargs)
            except TransientError as e:
                now = time.monotonic()
                if self._since is None:
                    self._since = now
                    log.warning("%s; retrying for up to %gs", e, self.seconds)
                    if self.on_wait is not None:
                        self.on_wait(str(e))
                if now - self._since >= self.seconds:
                    raise
                time.sleep(min(delay, max(0.0, self.seconds - (now - self._since))))
                delay = min(5.0, delay * 2)
                continue
            if self._since is not None:
                self._since = None
                if self.on_back is not None:
                    self.on_back()
            return out
