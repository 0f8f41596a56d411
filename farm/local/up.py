"""An embedded farm on one machine: a private Redis, a storage folder, worker subprocesses.

    >>> with LocalFarm(FarmSettings(), workers=2) as lf:   # nothing configured: all private
    ...     Farm(lf.settings).submit(...)

Used by `farm up`, `farm demo`, the tests and the benchmarks. Whatever it started, it stops.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from farm.local.embedded import RedisServer
from farm.local.launcher import Supervisor, plan
from farm.queue.routing import FINETUNE_QUEUE, RENDER_QUEUE
from farm.settings import FarmSettings, settings_env
from farm.state.tracker import require_noeviction

log = logging.getLogger("farm.up")

LOCAL_QUEUES = f"{RENDER_QUEUE},{FINETUNE_QUEUE}"
"""An embedded farm's workers serve renders and fine-tunes alike (`farm up --queues` narrows it)."""


class LocalFarm:
    """Start (and later stop) what a one-machine farm needs that is not already configured."""

    def __init__(
        self,
        settings: FarmSettings,
        workers: int = 1,
        device: str = "cpu",
        threads: int | None = None,
        preload: list[str] | None = None,
        log_dir: Path | None = None,
        write_state: bool = False,
        restart: bool = True,
        queues: str = LOCAL_QUEUES,
        gpus: Sequence[int] | None = None,
        metrics_port: int = 0,
    ) -> None:
        self.base = settings
        self.queues = queues
        """The queues every worker consumes: renders and fine-tunes, so one machine runs both."""
        self.restart = restart
        """Restart a worker that dies, as `farm up` does."""
        self.n_workers = workers
        self.device = device
        self.threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
        self.threads_asked = threads
        self.preload = preload or []
        self.log_dir = log_dir or settings.home / "logs"
        self.write_state = write_state
        self.gpus = list(gpus or [])
        """One worker per GPU index (`farm up --gpus`), instead of `workers` on `device`."""
        self.metrics_port = metrics_port
        self.redis: RedisServer | None = None
        self.supervisor: Supervisor | None = None
        self.settings = settings

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        """The worker processes now running, one per child (the supervisor replaces the dead)."""
        return self.supervisor.procs if self.supervisor else []

    def __enter__(self) -> LocalFarm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        home = self.base.home
        home.mkdir(parents=True, exist_ok=True)
        update: dict[str, object] = {"storage": self.base.storage_url()}
        if not self.base.redis_url:
            self.redis = RedisServer(home / "redis", appendonly=True)
            self.redis.start()
            update["redis_url"] = self.redis.url
        self.settings = self.base.model_copy(update=update)
        if self.redis is None:  # a Redis of its own is configured so; another must say so
            require_noeviction(self.settings)
        storage = self.settings.storage_url()
        if storage.startswith("file://"):
            from farm.storage import open_store

            open_store(self.settings)  # creates the folder
        if self.write_state:
            (home / "up.json").write_text(
                json.dumps(
                    {"redis_url": self.settings.redis_url, "storage": storage, "pid": os.getpid()}
                )
            )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        children = plan(
            gpus=self.gpus,
            workers=self.n_workers,
            device=self.device,
            threads=self.threads_asked if self.gpus else self.threads,
            queues=self.queues,
            preload=self.preload,
            metrics_port=self.metrics_port,
            log_dir=self.log_dir,
        )
        self.supervisor = Supervisor(children, settings_env(self.settings), restart=self.restart)
        self.supervisor.start()

    def restart_dead(self) -> int:
        """Restart workers that exited; how many were restarted."""
        return self.supervisor.restart_dead() if self.supervisor else 0

    def stop(self, timeout: float = 30.0) -> None:
        if self.supervisor:
            self.supervisor.stop(timeout)  # SIGTERM: each worker finishes the job in hand
            self.supervisor = None
        if self.redis:
            self.redis.stop()
            self.redis = None
        if self.write_state:
            (self.base.home / "up.json").unlink(missing_ok=True)
