"""What the API answers about jobs: a record as JSON, and the checks that find a tenant's own.

A job, batch, input or output of another tenant is the same 404 as one that does not exist:
`own_job` and `own_batch` are the only ways a route reaches one.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from farm.api.auth import Principal
from farm.api.checks import shown_key
from farm.api.errors import ApiError, not_found
from farm.jobs.record import JobRecord
from farm.state.tenants import DEFAULT_TENANT

MAX_JSON_BYTES = 64 << 20
"""The largest JSON body taken (a 10,000-spec `jobs:batch` is a few MB)."""

EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, or 413 once it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body: {declared} bytes, over the limit of {limit}", field="body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body: over the limit of {limit} bytes", field="body")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int = MAX_JSON_BYTES) -> Any:
    data = await read_body(request, limit)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body: not JSON ({e})", field="body") from None


def own_job(farm: Any, who: Principal, job_id: str) -> JobRecord:
    """The job's record if the caller may see it, else the 404 of a job that is not there."""
    if not isinstance(job_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", job_id):
        raise not_found("job", job_id)
    (tenant,) = farm.tracker.tenants.job_tenants([job_id])
    if tenant is None or not who.sees(tenant):
        raise not_found("job", job_id)
    rec = farm.tracker.get_many([job_id])[0]
    if rec is None:
        raise not_found("job", job_id)
    return rec


def stored_batch_name(who: Principal, name: str) -> str:
    """The name a tenant's batch has in Redis: `<tenant>.<name>` (the default tenant's and the
    CLI's batches keep their own names)."""
    if who.tenant in (None, DEFAULT_TENANT):
        return name
    return f"{who.tenant}.{name}"


def shown_batch_name(who: Principal, stored: str) -> str:
    prefix = f"{who.tenant}."
    if who.tenant not in (None, DEFAULT_TENANT) and stored.startswith(prefix):
        return stored[len(prefix) :]
    return stored


def own_batch(farm: Any, who: Principal, name: str) -> str:
    """The stored name of the caller's batch `name`, else a 404."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,95}", name):
        raise not_found("batch", name)
    stored = stored_batch_name(who, name)
    if who.tenant is not None and farm.tracker.tenants.batch_tenant(stored) != who.tenant:
        raise not_found("batch", name)
    if farm.tracker.batches.meta(stored) is None:
        raise not_found("batch", name)
    return stored


def job_view(farm: Any, rec: JobRecord, tenant: str | None) -> dict[str, Any]:
    """A job's record as the API shows it: its key as the tenant gave it, its webhook's
    delivery attempts."""
    spec = dict(rec.spec)
    if "key" in spec:
        spec["key"] = shown_key(tenant, spec["key"])
    out: dict[str, Any] = {
        "id": rec.id,
        "kind": rec.kind,
        "state": rec.state.value,
        "spec": spec,
        "attempt": rec.attempt,
        "worker": rec.worker,
        "created_at": rec.created_at,
        "started_at": rec.started_at,
        "finished_at": rec.finished_at,
        "progress": rec.progress.model_dump(),
        "cancel_requested": rec.cancel_requested,
        "error": rec.error,
        "outputs": rec.outputs,
        "mask": rec.mask,
        "meta": rec.meta,
        "queue": rec.queue,
        "depends_on": rec.depends_on,
    }
    if spec.get("webhook"):
        delivery = farm.tracker.webhooks.get(f"job.{rec.id}")
        out["webhook"] = {
            "url": spec["webhook"],
            "outcome": delivery["outcome"] if delivery else "pending",
            "event_id": delivery.get("event_id") if delivery else None,
            "attempts": delivery["attempts"] if delivery else [],
        }
    return out


def output_names(rec: JobRecord) -> list[tuple[str, str]]:
    """(name, URI) of what a job stored, as `farm fetch` names the files."""
    named = [(f"{i}.png", uri) for i, uri in enumerate(rec.outputs)]
    if rec.kind == "finetune":
        named = [(uri.rsplit("/", 1)[-1], uri) for uri in rec.outputs]
    named += [("mask.png", rec.mask)] if rec.mask else []
    named += [("meta.json", rec.meta)] if rec.meta else []
    return named
