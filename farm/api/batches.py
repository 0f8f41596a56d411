"""`/v1/batches`: a manifest of rows in, a batch by name out; status, retry, cancel.

    POST /v1/batches                 {"name", "rows": [...], "defaults": {...}, "variations",
                                      "seed", "webhook"}: rows as a JSONL manifest's, images and
                                      mask files as input URIs (`POST /v1/inputs`)
    GET  /v1/batches                 the tenant's batches
    GET  /v1/batches/{name}          counts per state, images, rate, ETA; failed jobs, reasons
    POST /v1/batches/{name}/retry    failed (and with {"cancelled": true} cancelled) slots
    POST /v1/batches/{name}/cancel

The rows go through the same manifest validation and batch submit as `farm batch submit`
(`farm.batches.submit.submit_batch`: every row checked before anything is written, idempotent
and resumable), over the tenant's view of the farm, under the stored name `<tenant>.<name>`.
A batch's `webhook` is POSTed once the batch has settled (every job ended).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from farm.api.auth import Principal, require
from farm.api.checks import refuse_input
from farm.api.context import TenantFarm
from farm.api.errors import ApiError, invalid
from farm.api.jobs import admit, limits_of
from farm.api.views import own_batch, read_json, shown_batch_name, stored_batch_name
from farm.batches.batch import Batch, check_name
from farm.batches.manifest import InvalidManifest, normalize, read_rows, validate_rows
from farm.batches.submit import submit_batch
from farm.errors import InvalidJob
from farm.inputs.resolver import is_uri
from farm.jobs.masks import parse_generator
from farm.jobs.specs import check_webhook
from farm.state.tenants import DEFAULT_TENANT
from farm.submit import Submission

router = APIRouter(tags=["batches"])

MAX_ROWS = 10_000
FAILED_SHOWN = 100
"""Failed jobs (with their reasons) a batch's status lists."""

BATCH_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["name", "rows"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,95}$"},
                    "rows": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": MAX_ROWS,
                        "items": {"type": "object"},
                    },
                    "defaults": {"type": "object"},
                    "variations": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "seed": {"type": "integer", "minimum": 0},
                    "webhook": {"type": "string", "maxLength": 2048},
                },
            }
        }
    },
}


def _check_inputs(view: Any, tenant: str, layers: list[tuple[str, dict[str, Any]]]) -> None:
    """Every image and mask file a row (or the defaults) names: an input of this tenant's."""
    wanted: list[tuple[str, str, Any]] = []
    for where, row in layers:
        for field in ("image", "mask"):
            value = row.get(field)
            if value is None or (field == "mask" and parse_generator(value) is not None):
                continue
            if not is_uri(value):
                raise InvalidJob(
                    f"{where}: {field}: over the API an input is the URI POST /v1/inputs "
                    f"returned, got {value!r}",
                    field=field,
                )
            wanted.append((where, field, value))
    store = view.store
    keys = [store.key_of(v) for _, _, v in wanted]
    owned = view.tracker.tenants.owns_inputs(tenant, [k or "" for k in keys])
    for (where, field, value), key, mine in zip(wanted, keys, owned, strict=True):
        if key is None or not mine:
            e = refuse_input(field, value)
            raise InvalidJob(f"{where}: {e}", field=field)


def create(ctx: Any, who: Principal, data: dict[str, Any]) -> dict[str, Any]:
    tenant = who.tenant or DEFAULT_TENANT
    name = check_name(data.get("name"))  # type: ignore[arg-type]
    if "." in name:
        raise InvalidJob(f"name: {name!r}: an API batch name has no '.'", field="name")
    rows, defaults = data.get("rows"), data.get("defaults") or {}
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise InvalidJob("rows: expected a non-empty list of objects", field="rows")
    if len(rows) > MAX_ROWS:
        raise ApiError(413, f"rows: at most {MAX_ROWS}, got {len(rows)}", field="rows")
    if not isinstance(defaults, dict):
        raise InvalidJob("defaults: expected an object", field="defaults")
    webhook = data.get("webhook")
    if webhook is not None:
        try:
            check_webhook(webhook)
        except ValueError as e:
            raise InvalidJob(f"webhook: {e}", field="webhook") from None
        from farm.api.webhooks import check_url

        check_url(webhook, ctx.settings.webhook_allow_private)
    view = TenantFarm(ctx.farm, tenant)
    _check_inputs(
        view, tenant, [("defaults", defaults)] + [(f"row {i}", r) for i, r in enumerate(rows)]
    )
    variations = data.get("variations") or 1
    if not isinstance(variations, int) or isinstance(variations, bool):
        raise InvalidJob(
            f"variations: must be a whole number, got {variations!r}", field="variations"
        )
    limits = limits_of(ctx, tenant)
    admit(ctx, tenant, limits, len(rows) * variations, take=False)
    stored = stored_batch_name(who, name)
    with tempfile.TemporaryDirectory(prefix="farm-api-batch-") as tmp:
        path = Path(tmp) / f"{name}.jsonl"
        lines = [{"defaults": defaults}] if defaults else []
        path.write_text("".join(json.dumps(r) + "\n" for r in [*lines, *rows]))
        try:
            # Nothing is written before every row is valid; the name is claimed just before.
            block, raw_rows = read_rows(path)
            base = normalize(block, "the defaults block", row=False)
            base = {k: v for k, v in base.items() if k not in ("variations", "seed")}
            validate_rows(Submission(view), path, raw_rows, base)
        except InvalidManifest as e:
            raise invalid(e, problems=e.lines()[:-1]) from None
        taken = (
            ctx.farm.tracker.batches.meta(stored) is not None
            and ctx.farm.tracker.tenants.batch_tenant(stored) != tenant
        )
        if taken or not ctx.farm.tracker.tenants.claim_batch(stored, tenant):
            raise ApiError(409, f"name: batch {name!r} is taken", field="name")
        if webhook:
            ctx.farm.tracker.tenants.set_batch_webhook(stored, webhook)
        result = submit_batch(
            cast(Any, view), path, stored, variations=variations, seed=data.get("seed")
        )
    ctx.farm.tracker.tenants.take(tenant, result.new, limits.jobs_per_minute, force=True)
    return {
        "name": name,
        "rows": result.rows,
        "variations": result.variations,
        "jobs": result.jobs,
        "new": result.new,
        "present": result.present,
    }


@router.post("/v1/batches", status_code=201, openapi_extra={"requestBody": BATCH_BODY})
async def create_batch(request: Request) -> dict[str, Any]:
    """Submit rows × variations as a batch (again: only what is missing)."""
    who = await run_in_threadpool(require, request, "submit")
    data = await read_json(request)
    if not isinstance(data, dict):
        raise ApiError(400, "body: expected a JSON object", field="body")
    return await run_in_threadpool(create, request.app.state.ctx, who, data)


def status(ctx: Any, who: Principal, name: str) -> dict[str, Any]:
    farm = ctx.farm
    stored = own_batch(farm, who, name)
    batch = Batch(farm, stored)
    st = batch.status()
    failed = []
    slots = [s for s in batch.slots() if s.state == "failed" and s.job][:FAILED_SHOWN]
    records = farm.tracker.get_many([s.job or "" for s in slots])
    for s, rec in zip(slots, records, strict=True):
        failed.append(
            {
                "job": s.job,
                "row": s.info.get("row"),
                "variation": s.info.get("variation"),
                "error": rec.error if rec else None,
            }
        )
    return {
        "name": shown_batch_name(who, stored),
        "total": st.total,
        "ended": st.total - st.pending,
        "counts": st.counts,
        "settled": st.settled,
        "images_done": st.images_done,
        "images_total": st.images_total,
        "rate": st.rate,
        "eta": st.eta,
        "failed": failed,
    }


@router.get("/v1/batches/{name}")
async def get_batch(request: Request, name: str) -> dict[str, Any]:
    """A batch's progress, with its failed jobs and their reasons."""
    who = await run_in_threadpool(require, request, "read")
    return await run_in_threadpool(status, request.app.state.ctx, who, name)


def names(ctx: Any, who: Principal) -> list[str]:
    tenants = ctx.farm.tracker.tenants
    stored = ctx.farm.tracker.batches.names(newest_first=True, limit=1000)
    owners = tenants.batch_tenants(stored)
    return [shown_batch_name(who, n) for n, t in zip(stored, owners, strict=True) if who.sees(t)]


@router.get("/v1/batches")
async def get_batches(request: Request) -> dict[str, Any]:
    """The tenant's batch names, newest first."""
    who = await run_in_threadpool(require, request, "read")
    return {"batches": await run_in_threadpool(names, request.app.state.ctx, who)}


def _retry(ctx: Any, who: Principal, name: str, cancelled: bool) -> dict[str, Any]:
    tenant = who.tenant or DEFAULT_TENANT
    stored = own_batch(ctx.farm, who, name)
    ids = Batch(cast(Any, TenantFarm(ctx.farm, tenant)), stored).retry(cancelled=cancelled)
    ctx.farm.tracker.tenants.take(
        tenant, len(ids), limits_of(ctx, tenant).jobs_per_minute, force=True
    )
    return {"name": name, "jobs": ids}


@router.post("/v1/batches/{name}/retry")
async def retry_batch(request: Request, name: str) -> dict[str, Any]:
    """New jobs for the failed slots (`{"cancelled": true}`: the cancelled ones too)."""
    who = await run_in_threadpool(require, request, "submit")
    data = (
        await read_json(request) if request.headers.get("content-length") not in (None, "0") else {}
    )
    cancelled = bool(data.get("cancelled")) if isinstance(data, dict) else False
    return await run_in_threadpool(_retry, request.app.state.ctx, who, name, cancelled)


def _cancel(ctx: Any, who: Principal, name: str) -> dict[str, Any]:
    stored = own_batch(ctx.farm, who, name)
    return {"name": name, "cancelled": Batch(ctx.farm, stored).cancel()}


@router.post("/v1/batches/{name}/cancel")
async def cancel_batch(request: Request, name: str) -> dict[str, Any]:
    """Cancel every job of the batch not yet ended."""
    who = await run_in_threadpool(require, request, "submit")
    return await run_in_threadpool(_cancel, request.app.state.ctx, who, name)
