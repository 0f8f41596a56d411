"""The dashboard, in the API's app: one page, its JSON, its live updates, its files.

    GET  /                      the page (`farm.api.page`); `/?job=<id>`, `/?batch=<name>`
    GET  /login, POST /login    a token in, a session cookie out (read scope); POST /logout
    GET  /api/overview          queue depths, workers, batches with progress, recent jobs
    GET  /api/overview/events   the same, as server-sent events whenever it changes
    GET  /api/job/<id>          one job's record and its images as /files/ URLs
    GET  /api/batch/<name>      one batch: progress, failed jobs with their reasons
    GET  /files/<key>           a stored object under inputs/, jobs/ or adapters/

Behind the same tokens as `/v1` (a bearer token, or the login's cookie), read scope; a
tenant sees its own jobs, batches and files. `farm dashboard` serves the app with the
operator as the caller of requests without credentials (loopback, every tenant). Answers are
plain text for errors (`farm unavailable: …` when Redis is unreachable: the page keeps
serving), security headers on everything, and a key is checked by `check_key` (no `..`, no
absolute path, no control characters) and must start with one of `FILE_PREFIXES`.
"""

from __future__ import annotations

import json
import mimetypes
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from redis import RedisError

from farm.api.auth import SESSION_COOKIE, Principal, authenticate, session_value
from farm.api.dashboard_data import FILE_PREFIXES, DashboardData
from farm.api.errors import ApiError
from farm.api.page import LOGIN, PAGE
from farm.errors import FarmError, InvalidJob, JobNotFound, TransientError
from farm.storage import ObjectNotFound, check_key

router = APIRouter(include_in_schema=False)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self' data:; connect-src 'self'; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
"""Sent with every dashboard answer: the page runs only its own inline script and loads only
from here (previews arrive as `data:` images)."""

DASHBOARD_PATHS = ("/api/", "/files/")
"""Paths (besides `/`) that are the dashboard's: read-only, answered in plain text."""

FILES_CACHE = "private, max-age=300"
"""Stored objects do not change under their keys (inputs are content-addressed, outputs are
written once per job), so the browser may keep thumbnails between refreshes."""

OVERVIEW_EVERY = 2.0
"""Seconds between two looks at the overview when no event comes (workers' heartbeats)."""


class BadRequest(Exception):
    """A request the dashboard refuses (400)."""


def file_key(key: str) -> str:
    """The storage key named by a `/files/<key>` path (percent-decoded once, by the server),
    or `BadRequest` saying why not."""
    try:
        check_key(key)
    except InvalidJob as e:
        raise BadRequest(str(e)) from e
    if not key.startswith(FILE_PREFIXES):
        raise BadRequest(f"storage key {key!r} is not under {', '.join(FILE_PREFIXES)}")
    return key


def _text(status: int, text: str) -> PlainTextResponse:
    return PlainTextResponse(text, status_code=status, headers=SECURITY_HEADERS)


def _caller(request: Request) -> Principal | None:
    try:
        return authenticate(request)
    except ApiError:
        return None
    except (FarmError, RedisError):
        return None


async def _answer(request: Request, work: Any, *args: Any) -> Response:
    """Run `work(data, *args)` for the caller; the dashboard's plain-text errors."""
    ctx = request.app.state.ctx
    try:
        who = await run_in_threadpool(authenticate, request)
        if not who.allows("read"):
            return _text(403, "this token lacks the 'read' scope\n")
        data = DashboardData(ctx.farm, who)
        return await run_in_threadpool(work, data, *args)
    except ApiError as e:
        return _text(e.status, f"{e.detail}\n")
    except (BadRequest, InvalidJob) as e:
        return _text(400, f"{e}\n")
    except (FileNotFoundError, ObjectNotFound, JobNotFound):
        return _text(404, "not found\n")
    except (FarmError, RedisError) as e:  # Redis or storage unreachable: say so, keep serving
        if isinstance(e, TransientError | RedisError):
            await run_in_threadpool(ctx.recover)
        return _text(503, f"farm unavailable: {type(e).__name__}\n")


class ReadOnly:
    """ASGI middleware: the dashboard's paths take GET and HEAD only (405 otherwise)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD"):
            path = scope["path"]
            if path in ("/", "/index.html") or path.startswith(DASHBOARD_PATHS):
                resp = PlainTextResponse(
                    "read-only\n",
                    status_code=405,
                    headers={**SECURITY_HEADERS, "Allow": "GET, HEAD"},
                )
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _json(value: Any) -> Response:
    return Response(
        json.dumps(value, separators=(",", ":")),
        media_type="application/json",
        headers=SECURITY_HEADERS,
    )


def _initial(request: Request, who: Principal) -> str:
    """The page's first data, read here and put in the page (JSON in a non-executed script
    element, `<` escaped), so it shows at once; live updates follow. Nothing on failure: the
    page reads it itself and shows the error."""
    data = DashboardData(request.app.state.ctx.farm, who)
    job, batch_name = request.query_params.get("job"), request.query_params.get("batch")
    try:
        value = data.job(job) if job else data.batch(batch_name) if batch_name else data.overview()
    except Exception:
        return ""
    text = json.dumps(value, separators=(",", ":")).replace("<", "\\u003c")
    return f'<script type="application/json" id="initial">{text}</script>'


@router.get("/")
@router.get("/index.html")
async def page(request: Request) -> Response:
    who = await run_in_threadpool(_caller, request)
    if who is None or not who.allows("read"):
        return RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
    initial = await run_in_threadpool(_initial, request, who)
    return HTMLResponse(PAGE.replace("<!--INITIAL-->", initial), headers=SECURITY_HEADERS)


@router.get("/login")
async def login_page() -> Response:
    return HTMLResponse(LOGIN.replace("{message}", ""), headers=SECURITY_HEADERS)


def _login(ctx: Any, token: str) -> str | None:
    found = ctx.farm.tracker.tenants.authenticate(token)
    if found is None or not found.allows("read"):
        return None
    return session_value(found.id, ctx.session_key, ctx.settings.api_session_seconds)


@router.post("/login")
async def login(request: Request) -> Response:
    """A token from the login form: a session cookie (read scope), then the page."""
    body = (await request.body())[:4096].decode("utf-8", "replace")
    token = (parse_qs(body).get("token") or [""])[0].strip()
    ctx = request.app.state.ctx
    try:
        cookie = await run_in_threadpool(_login, ctx, token)
    except (FarmError, RedisError) as e:
        return _text(503, f"farm unavailable: {type(e).__name__}\n")
    if cookie is None:
        page = LOGIN.replace("{message}", "Not a valid token with the read scope.")
        return HTMLResponse(page, status_code=401, headers=SECURITY_HEADERS)
    resp = RedirectResponse("/", status_code=303, headers=SECURITY_HEADERS)
    resp.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=ctx.settings.api_session_seconds,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return resp


@router.post("/logout")
async def logout() -> Response:
    resp = RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
    resp.delete_cookie(SESSION_COOKIE)
    return resp


@router.get("/api/overview")
async def overview(request: Request) -> Response:
    return await _answer(request, lambda data: _json(data.overview()))


@router.get("/api/job/{job_id:path}")
async def job(request: Request, job_id: str) -> Response:
    return await _answer(request, lambda data: _json(data.job(job_id)))


@router.get("/api/batch/{name}")
async def batch(request: Request, name: str) -> Response:
    return await _answer(request, lambda data: _json(data.batch(name)))


@router.get("/files/{key:path}")
async def files(request: Request, key: str) -> Response:
    job_id = request.query_params.get("job")

    def work(data: DashboardData) -> Response:
        k = file_key(key)
        if not data.may_read(k, job_id):
            raise FileNotFoundError(k)
        body = data.farm.store.get(k)
        ctype = mimetypes.guess_type(k)[0] or "application/octet-stream"
        return Response(
            body, media_type=ctype, headers={**SECURITY_HEADERS, "Cache-Control": FILES_CACHE}
        )

    return await _answer(request, work)


def _overviews(data: DashboardData) -> Iterator[str]:
    """The overview as server-sent events: now, then whenever it changes (woken by the events
    stream, or every `OVERVIEW_EVERY` for what changes without events: heartbeats)."""
    tracker = data.farm.tracker
    last = None
    cursor = tracker.last_event_id()
    quiet = time.monotonic()
    while True:
        try:
            view = data.overview()
        except (FarmError, RedisError) as e:
            yield f"event: unavailable\ndata: {json.dumps(type(e).__name__)}\n\n"
            return
        seen = json.dumps({**view, "now": 0}, sort_keys=True)
        if seen != last:
            last, quiet = seen, time.monotonic()
            yield f"event: overview\ndata: {json.dumps(view, separators=(',', ':'))}\n\n"
        elif time.monotonic() - quiet > 15:
            quiet = time.monotonic()
            yield ": keepalive\n\n"
        try:
            cursor = tracker.wait_event(cursor, OVERVIEW_EVERY)
        except (FarmError, RedisError):
            time.sleep(OVERVIEW_EVERY)


@router.get("/api/overview/events")
async def overview_events(request: Request) -> Response:
    def start(data: DashboardData) -> Response:
        return StreamingResponse(
            _overviews(data),
            media_type="text/event-stream",
            headers={**SECURITY_HEADERS, "X-Accel-Buffering": "no"},
        )

    return await _answer(request, start)
