"""The ASGI app: FastAPI over one `Farm`, its routes under `/v1`, OpenAPI at `/openapi.json`.

    >>> app = create_app(FarmSettings())              # `farm serve` runs it on uvicorn
    >>> app = create_app(settings, anonymous=OPERATOR) # `farm dashboard`: read-only, no login

Request bodies that are job specs are parsed by `farm.jobs.specs.parse_spec` (so a refusal is
the SDK's own message); OpenAPI still describes them with the specs' own JSON Schema, put into
`components/schemas` (`JobSpec` and every model it names): one source of truth.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter

import farm
from farm.api import batches, dashboard, events, farm_routes, inputs, jobs
from farm.api.auth import Principal
from farm.api.context import Context, local_farm
from farm.api.errors import install
from farm.jobs.specs import JobSpec
from farm.settings import FarmSettings, resolve_settings


def create_app(
    settings: FarmSettings | None = None,
    *,
    anonymous: Principal | None = None,
) -> FastAPI:
    """The app over the farm `settings` name (resolved as `Farm()` resolves them)."""
    base = settings or FarmSettings()
    resolved = resolve_settings(base)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Blocking calls (Redis, storage) and every following client hold a thread.
        anyio.to_thread.current_default_thread_limiter().total_tokens = resolved.api_threads
        yield
        app.state.ctx.farm.close()

    app = FastAPI(
        title="render-farm",
        version=farm.__version__,
        description="Submit, follow and fetch diffusion jobs: tokens, tenants, webhooks, SSE.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    ctx = Context(base=base, farm=local_farm(resolved), anonymous=anonymous)
    app.state.ctx = ctx
    install(app)
    app.add_middleware(dashboard.ReadOnly)
    for module in (jobs, events, inputs, batches, farm_routes, dashboard):
        app.include_router(module.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        spec = TypeAdapter(JobSpec).json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(spec.pop("$defs", {}))
        components["JobSpec"] = spec
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
