"""`/v1/jobs`: submit, list, read, cancel, and fetch outputs.

    POST   /v1/jobs                     one spec                      201 new, 200 present (key)
    POST   /v1/jobs:batch               {"jobs": [spec, ...]}         all checked, then written
    GET    /v1/jobs?state=&batch=&limit=&cursor=                      newest first
    GET    /v1/jobs/{id}                the record (webhook attempts included)
    DELETE /v1/jobs/{id}                cancel: queued at once, running within a step
    GET    /v1/jobs/{id}/outputs        names and URLs: presigned GETs on S3, this API locally
    GET    /v1/jobs/{id}/outputs/{name} the bytes

Submitting is the one submit pipeline (`farm.submit.Submission`) over the tenant's view of
the farm: 1. every spec parsed and checked (the SDK's checks, then the API's:
`farm.api.checks`), 2. prepared (inputs read, refs resolved), 3. the tenant's limits, 4.
written and enqueued. A refusal at any step before 4 writes nothing.
"""

from __future__ import annotations

import mimetypes
import time
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from farm.api.auth import Principal, require
from farm.api.checks import SpecChecks
from farm.api.context import TenantFarm
from farm.api.errors import ApiError, invalid, not_found, too_many
from farm.api.views import (
    job_view,
    output_names,
    own_batch,
    own_job,
    read_json,
)
from farm.batches.batch import Batch
from farm.errors import InvalidJob
from farm.jobs.state import JobState
from farm.state.tenants import DEFAULT_TENANT, Limits, Open
from farm.submit import Submission, gc_paused

router = APIRouter(tags=["jobs"])

MAX_SPECS = 10_000
"""Specs one `jobs:batch` takes."""

MAX_LIST = 1000
URL_SECONDS = 900
"""How long a presigned output URL lives."""

SPEC_BODY = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}}}
BATCH_BODY = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["jobs"],
                "additionalProperties": False,
                "properties": {
                    "jobs": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": MAX_SPECS,
                        "items": {"$ref": "#/components/schemas/JobSpec"},
                    }
                },
            }
        }
    }
}


LIMITS_SECONDS = 1.0
"""How long a tenant's limits, once read, are used before they are read again."""

_limits: dict[tuple[int, str], tuple[float, Limits]] = {}


def limits_of(ctx: Any, tenant: str) -> Limits:
    """The tenant's limits (its own, else the `FARM_API_*` defaults), read at most once a
    second per tenant: a change (`farm tokens limits`) holds within a second."""
    key, now = (id(ctx), tenant), time.monotonic()
    held = _limits.get(key)
    if held is not None and now - held[0] < LIMITS_SECONDS:
        return held[1]
    s = ctx.settings
    defaults = Limits(s.api_max_queued, s.api_jobs_per_minute, s.api_max_images)
    limits = ctx.farm.tracker.tenants.limits(tenant, defaults)
    _limits[key] = (now, limits)
    return limits


def admit(ctx: Any, tenant: str, limits: Limits, n: int, *, take: bool = True) -> Any:
    """The tenant's limits for `n` more jobs: 413 or 429, or the open-jobs count to prune."""
    tenants = ctx.farm.tracker.tenants
    if limits.jobs_per_minute and n > limits.jobs_per_minute:
        raise ApiError(
            413,
            f"jobs: {n} jobs in one request, over tenant {tenant!r}'s burst of "
            f"{limits.jobs_per_minute} (its jobs per minute): split it",
            field="jobs",
        )
    # No `max_queued`: nothing to count, and a round trip less per request.
    found = tenants.open_jobs(tenant, limits.max_queued, n) if limits.max_queued else Open(0)
    if limits.max_queued and found.count + n > limits.max_queued:
        raise too_many(
            f"jobs: tenant {tenant!r} has {found.count} jobs not yet ended; its limit is "
            f"{limits.max_queued}",
            retry_after=5,
            field="jobs",
        )
    if take:
        wait = tenants.take(tenant, n, limits.jobs_per_minute)
        if wait:
            raise too_many(
                f"jobs: tenant {tenant!r} may submit {limits.jobs_per_minute} jobs per minute",
                retry_after=wait,
                field="jobs",
            )
    return found


def submit_specs(ctx: Any, who: Principal, raws: list[Any], many: bool) -> list[dict[str, Any]]:
    """Check, prepare, admit and write; one {id, created} per spec, in order."""
    if many:  # up to 10,000 specs: as `Farm.submit_many`, without collector passes
        with gc_paused():
            return _submit_specs(ctx, who, raws, many)
    return _submit_specs(ctx, who, raws, many)


def _submit_specs(ctx: Any, who: Principal, raws: list[Any], many: bool) -> list[dict[str, Any]]:
    tenant = who.tenant or DEFAULT_TENANT
    view = TenantFarm(ctx.farm, tenant)
    limits = limits_of(ctx, tenant)
    checks = SpecChecks(view, tenant, limits)
    sub = Submission(view)
    records = []
    for i, raw in enumerate(raws):
        try:
            records.append(sub.prepare_alike(checks.parse(raw)))
        except InvalidJob as e:
            raise (invalid(e, index=i) if many else invalid(e)) from None
        except ApiError as e:
            if many:
                e.extra["index"] = i
            raise
    found = admit(ctx, tenant, limits, len(records))
    sub.store_inputs()
    written = sub.write(records)
    ctx.farm.tracker.tenants.forget_ended(tenant, found.ended)
    return [
        {"id": rec["id"], "created": new} for rec, new in zip(records, written.created, strict=True)
    ]


@router.post(
    "/v1/jobs", status_code=201, openapi_extra={"requestBody": {**SPEC_BODY, "required": True}}
)
async def create_job(request: Request) -> JSONResponse:
    """Submit one job: a txt2img, img2img, inpaint, style or finetune spec."""
    raw = await read_json(request)
    ctx = request.app.state.ctx

    def work() -> dict[str, Any]:  # one trip to a thread: the token, then the submit
        return submit_specs(ctx, require(request, "submit"), [raw], False)[0]

    out = await run_in_threadpool(work)
    return JSONResponse(out, status_code=201 if out["created"] else 200)


@router.post(
    "/v1/jobs:batch",
    status_code=201,
    openapi_extra={"requestBody": {**BATCH_BODY, "required": True}},
)
async def create_jobs(request: Request) -> JSONResponse:
    """Submit many jobs: every spec is checked before any is written."""
    who = await run_in_threadpool(require, request, "submit")
    data = await read_json(request)
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or set(data) - {"jobs"}:
        raise ApiError(400, 'body: expected {"jobs": [spec, ...]}', field="jobs")
    specs = data["jobs"]
    if not 1 <= len(specs) <= MAX_SPECS:
        status = 413 if len(specs) > MAX_SPECS else 422
        raise ApiError(status, f"jobs: 1 to {MAX_SPECS} specs, got {len(specs)}", field="jobs")
    ctx = request.app.state.ctx
    jobs = await run_in_threadpool(submit_specs, ctx, who, specs, True)
    new = sum(j["created"] for j in jobs)
    return JSONResponse(
        {"jobs": jobs, "new": new, "present": len(jobs) - new}, status_code=201 if new else 200
    )


def _cursor(text: str | None) -> tuple[float, str] | None:
    if not text:
        return None
    score, _, job_id = text.partition("_")
    try:
        return float(score), job_id
    except ValueError:
        raise ApiError(
            422, f"cursor: not a cursor this API gave, got {text!r}", field="cursor"
        ) from None


def list_jobs(
    ctx: Any,
    who: Principal,
    state: JobState | None,
    batch: str | None,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    farm = ctx.farm
    tenant = who.tenant or DEFAULT_TENANT
    before = _cursor(cursor)
    if batch is not None:
        stored = own_batch(farm, who, batch)
        ids = Batch(farm, stored).job_ids()
        made = farm.tracker.job_fields(ids, "created_at")
        pool = sorted(
            ((i, float(c[0])) for i, c in zip(ids, made, strict=True) if c[0]),
            key=lambda p: (p[1], p[0]),
            reverse=True,
        )
        if before is not None:
            pool = [p for p in pool if (p[1], p[0]) < (before[0], before[1])]
        pages = iter([pool])
    else:
        pages = _index_pages(farm, tenant, before)
    out: list[dict[str, Any]] = []
    last: tuple[str, float] | None = None
    scanned = 0
    for page in pages:
        records = farm.tracker.get_many([i for i, _ in page])
        for (job_id, score), rec in zip(page, records, strict=True):
            scanned += 1
            last = (job_id, score)
            if rec is not None and (state is None or rec.state == state):
                out.append(job_view(farm, rec, tenant))
                if len(out) == limit:
                    break
        if len(out) == limit or scanned >= 20 * MAX_LIST:
            break
    more = last is not None and (len(out) == limit or scanned >= 20 * MAX_LIST)
    return {"jobs": out, "cursor": f"{last[1]!r}_{last[0]}" if more and last else None}


def _index_pages(farm: Any, tenant: str, before: tuple[float, str] | None) -> Any:
    while True:
        page = farm.tracker.tenants.job_page(tenant, before, 200)
        if not page:
            return
        yield page
        job_id, score = page[-1]
        before = (score, job_id)


@router.get("/v1/jobs")
async def get_jobs(
    request: Request,
    state: JobState | None = None,
    batch: str | None = Query(default=None, max_length=128),
    limit: int = Query(default=50, ge=1, le=MAX_LIST),
    cursor: str | None = Query(default=None, max_length=128),
) -> dict[str, Any]:
    """The tenant's jobs, newest first; `cursor` from the previous page for the next."""
    who = await run_in_threadpool(require, request, "read")
    ctx = request.app.state.ctx
    return await run_in_threadpool(list_jobs, ctx, who, state, batch, limit, cursor)


def _get(ctx: Any, who: Principal, job_id: str) -> dict[str, Any]:
    rec = own_job(ctx.farm, who, job_id)
    return job_view(ctx.farm, rec, who.tenant)


@router.get("/v1/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    """One job's record."""
    who = await run_in_threadpool(require, request, "read")
    return await run_in_threadpool(_get, request.app.state.ctx, who, job_id)


def _cancel(ctx: Any, who: Principal, job_id: str) -> dict[str, Any]:
    rec = own_job(ctx.farm, who, job_id)
    if rec.state.terminal:
        raise ApiError(409, f"job {job_id}: already {rec.state.value}", field="state")
    state = ctx.farm.cancel(job_id)
    return {"id": job_id, "state": "cancelling" if state == JobState.RUNNING else state.value}


@router.delete("/v1/jobs/{job_id}", status_code=202)
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    """Cancel: a queued or waiting job at once, a running one within one step."""
    who = await run_in_threadpool(require, request, "submit")
    return await run_in_threadpool(_cancel, request.app.state.ctx, who, job_id)


def _outputs(ctx: Any, who: Principal, job_id: str, base: str) -> dict[str, Any]:
    farm = ctx.farm
    rec = own_job(farm, who, job_id)
    local = not farm.settings.storage_url().startswith("s3://")
    out = []
    for name, uri in output_names(rec):
        key = farm.store.key_of(uri)
        if key is None:
            continue
        url = (
            f"{base}v1/jobs/{job_id}/outputs/{name}" if local else farm.store.url(key, URL_SECONDS)
        )
        out.append({"name": name, "uri": uri, "url": url})
    return {"id": job_id, "state": rec.state.value, "outputs": out}


@router.get("/v1/jobs/{job_id}/outputs")
async def get_outputs(request: Request, job_id: str) -> dict[str, Any]:
    """What the job stored: on S3 short-lived presigned GET URLs, else URLs of this API."""
    who = await run_in_threadpool(require, request, "read")
    base = str(request.base_url)
    return await run_in_threadpool(_outputs, request.app.state.ctx, who, job_id, base)


def _output(ctx: Any, who: Principal, job_id: str, name: str) -> tuple[bytes, str]:
    farm = ctx.farm
    rec = own_job(farm, who, job_id)
    uri = dict(output_names(rec)).get(name)
    key = farm.store.key_of(uri) if uri else None
    if key is None:
        raise not_found("output", name)
    return farm.store.get(key), mimetypes.guess_type(name)[0] or "application/octet-stream"


@router.get("/v1/jobs/{job_id}/outputs/{name}")
async def get_output(request: Request, job_id: str, name: str) -> Response:
    """One stored output (`0.png`, `mask.png`, `meta.json`, a fine-tune's files), as bytes."""
    who = await run_in_threadpool(require, request, "read")
    data, ctype = await run_in_threadpool(_output, request.app.state.ctx, who, job_id, name)
    return Response(data, media_type=ctype, headers={"Cache-Control": "private, max-age=300"})
