"""Run the app: `farm serve` (the API, the dashboard and the webhook sender), `farm dashboard`.

    $ farm serve --host 0.0.0.0 --port 8000
    farm serve: http://0.0.0.0:8000/ (API under /v1, OpenAPI at /openapi.json, dashboard at /)

uvicorn on one socket that this module binds (so port 0 picks a free port and the printed URL
is the real one). With no API token in Redis yet, `farm serve` binds loopback whatever
`--host` says, and says so: an API nobody can log in to is for this machine only. The webhook
sender (`farm.api.sender`) runs as a child process and stops with the server.
"""

from __future__ import annotations

import gc
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from farm.api.app import create_app
from farm.api.auth import Principal
from farm.errors import PortInUse
from farm.settings import FarmSettings, settings_env

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def server(app: FastAPI, sock: socket.socket, access_log: bool = False) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=access_log,
        timeout_graceful_shutdown=3,
        lifespan="on",
    )
    return uvicorn.Server(config)


@contextmanager
def in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a thread of this process (tests, the benchmark); yields its URL."""
    sock = bind(host, port)
    srv = server(app, sock)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        if not thread.is_alive():
            raise RuntimeError("the API server did not start")
        threading.Event().wait(0.02)
    try:
        yield url_of(sock)
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def sender_process(settings: FarmSettings) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m farm.api.sender` beside the server, stopped with it."""
    proc = subprocess.Popen([sys.executable, "-m", "farm.api.sender"], env=settings_env(settings))
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(
    settings: FarmSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    anonymous: Principal | None = None,
    webhooks: bool = True,
    name: str = "farm serve",
    access_log: bool = False,
) -> None:
    """Serve until interrupted; prints the URL first (port 0 picks a free one)."""
    app = create_app(settings, anonymous=anonymous)
    ctx = app.state.ctx
    if anonymous is None and host not in LOOPBACK and not ctx.farm.tracker.tenants.tokens():
        print(
            f"{name}: no API token exists yet (`farm tokens create NAME --tenant T`): "
            f"binding 127.0.0.1 only, not {host}",
            file=sys.stderr,
            flush=True,
        )
        host = "127.0.0.1"
    elif anonymous is not None and host not in LOOPBACK:
        print(
            f"{name}: listening on {host}: anyone who reaches it sees jobs and images",
            file=sys.stderr,
        )
    try:
        sock = bind(host, port)
    except OSError as e:
        PortInUse.check(e, name, host, port)
        raise
    url = url_of(sock)
    extra = (
        ""
        if anonymous is not None
        else " (API under /v1, OpenAPI at /openapi.json, dashboard at /)"
    )
    print(f"{name}: {url}{extra}", flush=True)
    srv = server(app, sock, access_log)
    # What start-up built (the app, its routes and schemas, the imported modules) lives as long
    # as the server: out of the collector's sight, a full collection no longer walks it in the
    # middle of a request (the tail of the single-submit latency).
    gc.collect()
    gc.freeze()

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # uvicorn shuts down on SIGTERM, then raises it again under the handler it found: ours, so
    # the webhook sender below is stopped rather than orphaned.
    signal.signal(signal.SIGTERM, interrupt)
    if webhooks:
        with sender_process(ctx.settings):
            srv.run(sockets=[sock])
    else:
        srv.run(sockets=[sock])
