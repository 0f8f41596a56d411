"""One embedded farm per home: `farm up` holds an flock on `FARM_HOME/up.lock` while it runs.

A second `farm up` on the same home would start a second redis-server on the same AOF file,
overwrite `up.json`, share the workers' log files and, when it stopped, delete the first farm's
`up.json`. It is refused instead, before it touches anything:

    $ farm up
    farm: error: a farm is already running here (pid 4242, FARM_HOME /home/me/.cache/render-farm)

The kernel drops an flock when its holder dies, however it dies, so a farm that was killed
leaves nothing that blocks the next one (its stale `up.json` is rewritten). The lock file
keeps the holder's pid, for that message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from farm.errors import InvalidJob


class FarmAlreadyRunning(InvalidJob):
    """Another live process holds this home's lock (a `farm up` on the same `FARM_HOME`)."""


class HomeLock:
    """The exclusive lock of one farm home, held from `acquire` until `release` (or death)."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.path = self.home / "up.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or `FarmAlreadyRunning` naming the pid that holds it."""
        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FarmAlreadyRunning(
                f"a farm is already running here (pid {holder}, FARM_HOME {self.home}); "
                "stop it first (Ctrl-C in its terminal), or give this one another FARM_HOME",
                field="FARM_HOME",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let go. The file stays: removing it could race the next farm's `acquire`."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None
