"""moto's S3 in server mode, over HTTP on loopback: the tests' (and benchmarks') S3 server."""

from __future__ import annotations

import http.client
import importlib.util
import os
import sys
import tempfile
import time
from typing import IO, Self

from farm.local.embedded import START_TIMEOUT, ChildProcess, ServerError, free_port, stop_process

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
"""What a client of this server needs in its environment: any credentials (moto takes them
all), a region, and none of the developer's own AWS files or proxies."""


class S3Server(ChildProcess):
    """moto's S3 in server mode (`python -m moto.server`), over HTTP on 127.0.0.1.

    For tests and dev only. State lives in the process's memory and dies with it. Clients need
    some AWS credentials (any value) in their environment.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port
        self._auto_port = port is None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"S3Server(endpoint_url={self.endpoint_url!r}, running={self.running})"

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise ServerError("S3Server has no port until it is started")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        if self.running:
            return self
        if importlib.util.find_spec("moto") is None:
            raise ServerError("S3Server needs moto: pip install 'moto[server]' (a dev extra)")
        for attempt in range(3 if self._auto_port else 1):
            if self._auto_port and (self.port is None or attempt):
                self.port = free_port()
            if self._log is not None:
                self._log.close()
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
            argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
            self._launch(argv, self._log)
            try:
                self._wait_ready(timeout)
                return self
            except ServerError:
                self.kill()
                self._log.seek(0)
                log_tail = self._log.read().decode(errors="replace")
                self._log.close()
                if "in use" in log_tail and attempt < 2 and self._auto_port:
                    continue
                raise ServerError(
                    f"moto server on {self.endpoint_url} did not start; its output:\n"
                    f"{log_tail[-3000:]}"
                ) from None
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ServerError("moto server exited")
            conn = http.client.HTTPConnection("127.0.0.1", self.port or 0, timeout=1.0)
            try:
                conn.request("GET", "/moto-api/")
                conn.getresponse().read()
                return  # any HTTP answer means it is serving
            except OSError:
                time.sleep(0.05)
            finally:
                conn.close()
        raise ServerError(f"moto server did not answer HTTP within {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)
            self._reaped()
        if self._log is not None:
            self._log.close()
            self._log = None
