"""An embedded farm on one machine: a private Redis, a storage folder, worker subprocesses.

    >>> with LocalFarm(FarmSettings(), workers=2) as lf:   # nothing configured: all private
    ...     Farm(lf.settings).submit(...)

Used by `farm up`, `farm demo`, the tests and the benchmarks. Whatever it started, it stops:
the workers first (each hands its job back, which needs Redis), then Redis. One farm per home
at a time: a farm that starts a private Redis or writes `up.json` holds the home's lock
(`farm.local.lock`), so a second `farm up` there is refused before it touches anything.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from farm.errors import TransientError
from farm.local.embedded import RedisServer
from farm.local.launcher import Supervisor, plan
from farm.local.lock import HomeLock
from farm.queue.routing import FINETUNE_QUEUE, RENDER_QUEUE
from farm.settings import FarmSettings, settings_env
from farm.state.tracker import Tracker, require_noeviction

log = logging.getLogger("farm.up")

LOCAL_TOKEN = "farm-up"
"""The name of the local admin token `farm up` makes for its API."""

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
        api_port: int | None = None,
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
        self.api_port = api_port
        """Start the HTTP API (`farm serve`, with its webhook sender) on this loopback port
        (0: any free one); None: no API."""
        self.api: subprocess.Popen[str] | None = None
        self.api_url: str | None = None
        self.api_token: str | None = None
        """A local admin token (tenant `default`), made anew by each start."""
        self.redis: RedisServer | None = None
        self.supervisor: Supervisor | None = None
        self.settings = settings
        self.lock: HomeLock | None = None
        self._tracker: Tracker | None = None

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        """The worker processes now running, one per child (the supervisor replaces the dead)."""
        return self.supervisor.procs if self.supervisor else []

    @property
    def worker_names(self) -> list[str]:
        """The names the workers register under (`farm workers` lists them)."""
        return [c.name for c in self.supervisor.children] if self.supervisor else []

    def ready_workers(self) -> list[str]:
        """The registry names of this farm's workers that take jobs now (online, their
        consumer attached), found by their pids: a worker whose name was taken serves
        under another (`cpu0-2@host`). Redis away: none."""
        if self._tracker is None:
            self._tracker = Tracker.from_settings(self.settings)
        pids = {p.pid for p in self.procs}
        try:
            entries = self._tracker.workers.read(starting=True)
        except TransientError:
            return []
        now, host = time.time(), socket.gethostname()
        return [
            w.name
            for w in entries
            if w.pid in pids and w.host == host and w.online(now) and w.ready
        ]

    def __enter__(self) -> LocalFarm:
        try:
            self.start()
        except BaseException:  # a Ctrl-C half-way: stop what did start
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        home = self.base.home
        home.mkdir(parents=True, exist_ok=True)
        if self.write_state or not self.base.redis_url:
            lock = HomeLock(home)
            lock.acquire()  # FarmAlreadyRunning: nothing started, nothing written or removed
            self.lock = lock
        update: dict[str, object] = {"storage": self.base.storage_url()}
        if not self.base.redis_url:
            self.redis = RedisServer(home / "redis", appendonly=True, die_with_parent=True)
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
        if self.api_port is not None:
            self._start_api(self.api_port)

    def _start_api(self, port: int) -> None:
        """`farm serve` on loopback beside the farm, and a local admin token for it."""
        from farm.state.tracker import Tracker

        tracker = Tracker.from_settings(self.settings)
        try:
            tracker.tenants.revoke(LOCAL_TOKEN)  # one local token at a time: the newest
            self.api_token = tracker.tenants.create_token(LOCAL_TOKEN, "default", ["admin"])[1]
        finally:
            tracker.close()
        log = (self.log_dir / "api.log").open("ab")
        self.api = subprocess.Popen(
            [sys.executable, "-m", "farm", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=settings_env(self.settings),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        line = self.api.stdout.readline() if self.api.stdout else ""
        if not line.startswith("farm serve: http"):
            self.api.wait(10)
            raise RuntimeError(f"the API did not start (see {self.log_dir / 'api.log'})")
        self.api_url = line.split()[2]

    def restart_dead(self) -> int:
        """Restart workers that exited; how many were restarted."""
        return self.supervisor.restart_dead() if self.supervisor else 0

    def stop(self, timeout: float = 30.0) -> None:
        """The API first (no new submissions), then the workers (SIGTERM: each stops at its
        next step and hands its job back, which needs Redis), then Redis, then the state file
        and the lock."""
        if self.api:
            self.api.terminate()  # uvicorn stops, then its webhook sender
            try:
                self.api.wait(timeout)
            except subprocess.TimeoutExpired:
                self.api.kill()
                self.api.wait()
            self.api = None
        if self.supervisor:
            self.supervisor.stop(timeout)
            self.supervisor = None
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        if self.redis:
            self.redis.stop()
            self.redis = None
        if self.lock:
            if self.write_state:
                (self.base.home / "up.json").unlink(missing_ok=True)
            self.lock.release()
            self.lock = None
