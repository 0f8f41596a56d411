"""The API's errors: one JSON shape, the farm's own messages, a status that fits.

    {"detail": "width: must be a multiple of 8, got 100", "field": "width"}

`detail` is the very line the CLI prints after `farm: error:` (the same `InvalidJob`), and
`field` names what was wrong; a batch's refused spec adds its `index`. Statuses:

    400  the body is not JSON (or not the JSON a route takes)
    401  no token, or one that is not (or no longer) valid       WWW-Authenticate: Bearer
    403  a valid token without the scope the route needs
    404  no such job, batch, input or output for this tenant (another tenant's is the same 404)
    409  the request conflicts with what is there (cancel an ended job, a batch name taken)
    413  too large: a body, an upload, images per job, a batch over the tenant's burst
    422  a spec or field the farm refuses (`InvalidJob`): nothing was written
    429  over a tenant's limit: jobs per minute, jobs not yet ended      Retry-After: seconds
    503  Redis or storage unreachable (`TransientError`): a retry may get through
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from farm.errors import FarmError, InvalidJob, JobNotFound, TransientError
from farm.storage import ObjectNotFound, StorageError

log = logging.getLogger("farm.api")


class ApiError(Exception):
    """An answer other than 2xx, with the farm's JSON body."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.headers = headers or {}
        self.extra = extra


def not_found(what: str = "job", ident: str = "") -> ApiError:
    """The one 404 for anything this tenant cannot see, whether or not it exists elsewhere."""
    return ApiError(404, f"{what} {ident!r}: not found" if ident else f"{what}: not found")


def too_many(detail: str, retry_after: float, field: str | None = None) -> ApiError:
    return ApiError(
        429, detail, field=field, headers={"Retry-After": str(max(1, math.ceil(retry_after)))}
    )


def body(status: int, detail: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"detail": detail}
    if field is not None:
        out["field"] = field
    return {**out, **extra}


def _answer(err: ApiError) -> JSONResponse:
    return JSONResponse(
        body(err.status, err.detail, err.field, **err.extra),
        status_code=err.status,
        headers=err.headers,
    )


def invalid(e: InvalidJob, **extra: Any) -> ApiError:
    return ApiError(422, str(e), field=e.field, **extra)


def install(app: FastAPI) -> None:
    """Map the farm's exceptions to answers on `app`."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, e: ApiError) -> JSONResponse:
        return _answer(e)

    @app.exception_handler(InvalidJob)
    async def _invalid(request: Request, e: InvalidJob) -> JSONResponse:
        return _answer(invalid(e))

    @app.exception_handler(JobNotFound)
    async def _missing(request: Request, e: JobNotFound) -> JSONResponse:
        return _answer(ApiError(404, str(e)))

    @app.exception_handler(ObjectNotFound)
    async def _no_object(request: Request, e: ObjectNotFound) -> JSONResponse:
        return _answer(ApiError(404, "object: not found"))

    @app.exception_handler(TransientError)
    async def _transient(request: Request, e: TransientError) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, e)
        return _answer(ApiError(503, f"farm unavailable: {e}", headers={"Retry-After": "5"}))

    @app.exception_handler(StorageError)
    async def _storage(request: Request, e: StorageError) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, e)
        return _answer(ApiError(503, f"farm unavailable: {e}", headers={"Retry-After": "5"}))

    @app.exception_handler(FarmError)
    async def _farm(request: Request, e: FarmError) -> JSONResponse:
        return _answer(ApiError(409, str(e)))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or None
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        value = first.get("input")
        shown = "" if value is None or isinstance(value, dict) else f" (got {value!r:.80})"
        return _answer(ApiError(422, f"{field}: {msg}{shown}" if field else msg, field=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            body(e.status_code, str(e.detail)),
            status_code=e.status_code,
            headers=dict(e.headers or {}),
        )
