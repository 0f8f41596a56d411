"""`farm dashboard`: a small read-only web page served by the farm.

    $ farm dashboard --port 8765
    farm dashboard: http://127.0.0.1:8765/

One page (`farm.dashboard.page`, inline CSS and JS, nothing from a CDN) that polls a JSON API:

    GET /                  the page; `/?job=<id>` shows one job (input, mask, outputs)
    GET /api/overview      queue depths, workers, batches with progress, recent jobs
    GET /api/job/<id>      one job's record and its images as /files/ URLs
    GET /files/<key>       a stored object, only under inputs/, jobs/ or adapters/

The standard library's `ThreadingHTTPServer`, no web framework. It binds loopback unless told
otherwise, accepts only GET and HEAD, and serves from the farm's own store only: a key is
checked by `farm.storage.base.check_key` (no `..`, no absolute path, no control characters) and
must start with one of `FILE_PREFIXES`; anything else is 400, a missing object 404.
"""

from __future__ import annotations

import json
import mimetypes
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from redis import RedisError

from farm.dashboard.data import FILE_PREFIXES, DashboardData
from farm.dashboard.page import PAGE
from farm.errors import FarmError, InvalidJob, JobNotFound
from farm.storage import ObjectNotFound, check_key

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; connect-src 'self'; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
"""Sent with every answer: the page runs only its own inline script and loads only from here."""


FILES_CACHE = "private, max-age=300"
"""Stored objects do not change under their keys (inputs are content-addressed, outputs are
written once per job), so the browser may keep thumbnails between refreshes."""


class BadRequest(Exception):
    """A request the dashboard refuses (400)."""


def file_key(path: str) -> str:
    """The storage key named by a `/files/<key>` path, or `BadRequest` saying why not."""
    key = unquote(path[len("/files/") :])
    try:
        check_key(key)
    except InvalidJob as e:
        raise BadRequest(str(e)) from e
    if not key.startswith(FILE_PREFIXES):
        raise BadRequest(f"storage key {key!r} is not under {', '.join(FILE_PREFIXES)}")
    return key


class Handler(BaseHTTPRequestHandler):
    """Routes one request; `server.data` is the shared `DashboardData`."""

    server: DashboardServer
    server_version = "farm-dashboard"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def _refuse(self) -> None:
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            b"read-only\n",
            "text/plain",
            extra={"Allow": "GET, HEAD"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _answer(self, head: bool) -> None:
        # The raw path, not a normalised one: `/files/../x` must reach `file_key` as written.
        path = self.path.partition("?")[0]  # the page reads `?job=` itself
        extra: dict[str, str] = {}
        data = self.server.data
        try:
            if path in ("/", "/index.html"):
                body, ctype = PAGE.encode(), "text/html; charset=utf-8"
            elif path == "/api/overview":
                body, ctype = _json(data.overview()), "application/json"
            elif path.startswith("/api/job/"):
                body, ctype = _json(data.job(unquote(path[len("/api/job/") :]))), "application/json"
            elif path.startswith("/files/"):
                key = file_key(path)
                body = data.farm.store.get(key)
                ctype = mimetypes.guess_type(key)[0] or "application/octet-stream"
                extra = {"Cache-Control": FILES_CACHE}
            else:
                raise FileNotFoundError(path)
        except (BadRequest, InvalidJob) as e:
            return self._send(HTTPStatus.BAD_REQUEST, f"{e}\n".encode(), "text/plain", head=head)
        except (FileNotFoundError, ObjectNotFound, JobNotFound):
            return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", head=head)
        except (FarmError, RedisError) as e:  # Redis or storage unreachable: say so, keep serving
            msg = f"farm unavailable: {type(e).__name__}\n".encode()
            return self._send(HTTPStatus.SERVICE_UNAVAILABLE, msg, "text/plain", head=head)
        self._send(HTTPStatus.OK, body, ctype, head=head, extra=extra)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        ctype: str,
        head: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, data: DashboardData, host: str, port: int, verbose: bool = False):
        super().__init__((host, port), Handler)
        self.data = data
        self.verbose = verbose

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}/"


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def serve(data: DashboardData, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until interrupted; prints the URL first (port 0 picks a free one)."""
    with DashboardServer(data, host, port, verbose=True) as server:
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"farm dashboard: listening on {host}: anyone who reaches it sees jobs and images",
                file=sys.stderr,
            )
        print(f"farm dashboard: {server.url}", flush=True)
        server.serve_forever()
