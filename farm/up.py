"""An embedded farm on one machine: a private Redis, a storage folder, worker subprocesses.

    >>> with LocalFarm(FarmSettings(), workers=2) as lf:   # nothing configured: all private
    ...     Farm(lf.settings).submit(...)

Used by `farm up`, `farm demo`, the tests and the benchmarks. Whatever it started, it stops.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from farm.embedded import RedisServer
from farm.jobs import FINETUNE_QUEUE, RENDER_QUEUE
from farm.settings import FarmSettings

log = logging.getLogger("farm.up")

LOCAL_QUEUES = f"{RENDER_QUEUE},{FINETUNE_QUEUE}"
"""An embedded farm's workers serve renders and fine-tunes alike (`farm up --queues` narrows it)."""


def worker_command(
    device: str = "cpu",
    threads: int | None = None,
    queues: str | None = None,
    name: str | None = None,
    preload: list[str] | None = None,
) -> list[str]:
    cmd = [sys.executable, "-m", "farm", "worker", "--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    if queues:
        cmd += ["--queues", queues]
    if name:
        cmd += ["--name", name]
    for ref in preload or []:
        cmd += ["--preload", ref]
    return cmd


def settings_env(settings: FarmSettings) -> dict[str, str]:
    """The environment that hands these settings to a child process."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"FARM_{name.upper()}"] = str(value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


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
    ) -> None:
        self.base = settings
        self.queues = queues
        """The queues every worker consumes: renders and fine-tunes, so one machine runs both."""
        self.restart = restart
        """Restart a worker that dies, as `farm up` does."""
        self.n_workers = workers
        self.device = device
        self.threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
        self.preload = preload or []
        self.log_dir = log_dir or settings.home / "logs"
        self.write_state = write_state
        self.redis: RedisServer | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.settings = settings

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
        for i in range(self.n_workers):
            self.procs.append(self._spawn(i))
        if self.restart:
            threading.Thread(target=self._supervise, name="supervisor", daemon=True).start()

    def _supervise(self) -> None:
        """Restart workers that die (a crash, an out-of-memory kill, a poison job)."""
        while not self._stopping.wait(0.5):
            with self._lock:
                if not self._stopping.is_set():
                    self.restart_dead()

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        name = f"{self.device}-{i}@{os.uname().nodename}"
        logfile = open(self.log_dir / f"worker-{i}.log", "ab")  # noqa: SIM115 - owned by the child
        return subprocess.Popen(
            worker_command(self.device, self.threads, self.queues, name=name, preload=self.preload),
            env=settings_env(self.settings),
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def restart_dead(self) -> int:
        """Restart workers that exited; how many were restarted."""
        n = 0
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                log.warning("worker %d exited with %s; restarting it", i, p.returncode)
                self.procs[i] = self._spawn(i)
                n += 1
        return n

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        with self._lock:
            procs = list(self.procs)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # warm shutdown: finish the job in hand
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self.redis:
            self.redis.stop()
            self.redis = None
        if self.write_state:
            (self.base.home / "up.json").unlink(missing_ok=True)
