"""What the farm offers and who serves it, and whether this API is alive and ready.

GET /v1/models     built-in models and the models online workers hold warm    read
GET /v1/workers    the worker registry (device, warm models, current job)     admin
GET /v1/tenant     the caller's tenant: its limits, and (admin) its webhook secret
GET /healthz       200 while the process serves                               no token
GET /readyz        200 once Redis answers, else 503 (the readiness probe)     no token
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from farm.api.auth import require
from farm.api.jobs import limits_of
from farm.errors import FarmError
from farm.jobs.refs import BUILTIN_IP_ADAPTERS, BUILTIN_MODELS
from farm.state.tenants import DEFAULT_TENANT

router = APIRouter()


def _models(ctx: Any) -> dict[str, Any]:
    now = time.time()
    warm: dict[str, list[str]] = {}
    for w in ctx.farm.tracker.workers.read():
        if w.online(now):
            for m in w.models:
                warm.setdefault(m, []).append(w.name)
    builtin: list[dict[str, Any]] = [
        {"ref": r, "about": a, "builtin": True} for r, a in BUILTIN_MODELS.items()
    ]
    builtin += [
        {"ref": r, "about": a, "builtin": True, "ip_adapter": True}
        for r, a in BUILTIN_IP_ADAPTERS.items()
    ]
    for m in builtin:
        m["warm_on"] = warm.pop(str(m["ref"]), [])
    others = [{"ref": r, "builtin": False, "warm_on": names} for r, names in sorted(warm.items())]
    return {"models": builtin + others}


@router.get("/v1/models", tags=["farm"])
async def models(request: Request) -> dict[str, Any]:
    """Built-in models, and every model an online worker holds warm (with those workers)."""
    await run_in_threadpool(require, request, "read")
    return await run_in_threadpool(_models, request.app.state.ctx)


def _workers(ctx: Any) -> dict[str, Any]:
    now = time.time()
    entries = ctx.farm.tracker.workers.read()
    return {"workers": [{**w.model_dump(mode="json"), "online": w.online(now)} for w in entries]}


@router.get("/v1/workers", tags=["farm"])
async def workers(request: Request) -> dict[str, Any]:
    """The worker registry: who serves, on what device, holding which models (admin)."""
    await run_in_threadpool(require, request, "admin")
    return await run_in_threadpool(_workers, request.app.state.ctx)


def _tenant(ctx: Any, tenant: str, admin: bool) -> dict[str, Any]:
    limits = limits_of(ctx, tenant)
    out: dict[str, Any] = {
        "tenant": tenant,
        "limits": {
            "max_queued": limits.max_queued,
            "jobs_per_minute": limits.jobs_per_minute,
            "max_images": limits.max_images,
        },
    }
    if admin:
        out["webhook_secret"] = ctx.farm.tracker.tenants.webhook_secret(tenant)
    return out


@router.get("/v1/tenant", tags=["farm"])
async def tenant(request: Request) -> dict[str, Any]:
    """The caller's tenant and its limits (0: none); with admin scope, its webhook secret."""
    who = await run_in_threadpool(require, request, "read")
    return await run_in_threadpool(
        _tenant, request.app.state.ctx, who.tenant or DEFAULT_TENANT, who.allows("admin")
    )


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, bool]:
    """Alive: the process answers."""
    return {"ok": True}


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> JSONResponse:
    """Ready: Redis answers (what a load balancer or Kubernetes waits for)."""
    ctx = request.app.state.ctx
    try:
        await run_in_threadpool(ctx.farm.tracker.ping)
    except FarmError as e:
        await run_in_threadpool(ctx.recover)
        return JSONResponse({"ok": False, "detail": str(e)}, status_code=503)
    return JSONResponse({"ok": True})
