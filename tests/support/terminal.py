"""A command run in a real pseudo-terminal, as a user's shell runs it: the command leads its own
session with the terminal as its controlling terminal, in the foreground process group, so a
`^C` typed into the terminal (`Terminal.ctrl_c`, the byte 0x03) makes the kernel send SIGINT
to that whole group, not to one pid."""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import sys
import threading
import time
from collections.abc import Sequence


class Terminal:
    """`python -m farm ARGS` (or any argv) on a pty; its screen is `output`."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: str | None = None) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: a session leader whose controlling terminal is the pty
            try:
                if cwd:
                    os.chdir(cwd)
                os.execve(argv[0], list(argv), env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self.status: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def farm(cls, *args: object, env: dict[str, str], cwd: str | None = None) -> Terminal:
        return cls([sys.executable, "-m", "farm", *map(str, args)], env, cwd)

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: the other side closed (the command exited)
                return
            if not data:
                return
            with self._lock:
                self._chunks.append(data)

    @property
    def output(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace").replace("\r\n", "\n")

    def wait_for(self, text: str, timeout: float = 60) -> None:
        """Until `text` is on the screen; AssertionError (with the screen) after `timeout`."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.poll() is None, f"exited ({self.status}) before {text!r}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout}s:\n{self.output}"
            time.sleep(0.05)

    def ctrl_c(self) -> None:
        """Type Ctrl-C: the terminal's line discipline signals the foreground process group."""
        os.write(self.fd, b"\x03")

    def poll(self) -> int | None:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            assert time.monotonic() < deadline, f"still running after {timeout}s:\n{self.output}"
            time.sleep(0.05)
        self._reader.join(timeout=5)
        assert self.status is not None
        return self.status

    def close(self) -> None:
        """Kill it (and its process group) if it still runs; release the terminal."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.wait(30)
        os.close(self.fd)
