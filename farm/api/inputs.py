"""`POST /v1/inputs`: an image or mask upload, content-addressed, through the one resolver.

    curl -H "Authorization: Bearer $TOKEN" --data-binary @cat.png http://farm:8000/v1/inputs
    {"uri": "s3://bucket/farm/inputs/<sha256>.png", "key": "inputs/<sha256>.png", ...}
    curl ... --data-binary @mask.png 'http://farm:8000/v1/inputs?mask=true'

The body is the file itself (PNG, JPEG or WEBP). It is decoded, checked and encoded by the
input resolver (`farm.inputs.resolver`) exactly as a local file given to the SDK is: the same
formats, sizes, bomb limits, EXIF orientation, RGB (one channel for `mask=true`), so the URI
names the very picture a worker reads. The upload is recorded as the tenant's
(`Tenants.add_inputs`): the only inputs its specs may name.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from farm.api.auth import Principal, require
from farm.api.views import read_body
from farm.inputs.images import sha256_hex
from farm.inputs.resolver import InputResolver
from farm.state.tenants import DEFAULT_TENANT

router = APIRouter(tags=["inputs"])

MAX_UPLOAD_BYTES = 64 << 20
"""The largest upload taken (the decoder's own pixel limits apply beneath it)."""

UPLOAD_BODY = {
    "required": True,
    "content": {
        media: {"schema": {"type": "string", "format": "binary"}}
        for media in ("image/png", "image/jpeg", "image/webp", "application/octet-stream")
    },
}


def upload(ctx: Any, who: Principal, data: bytes, mask: bool) -> dict[str, Any]:
    tenant = who.tenant or DEFAULT_TENANT
    inputs = InputResolver(ctx.farm.store)
    field = "mask_image" if mask else "image"
    uri, picture = inputs.image(data, field, mask=mask)
    items = inputs.take_uploads()
    ctx.farm.store.put_missing(items)
    ctx.farm.tracker.tenants.add_inputs(tenant, list(items))
    (key,) = list(items)
    return {
        "uri": uri,
        "key": key,
        "sha256": sha256_hex(items[key]),
        "width": picture.width,
        "height": picture.height,
        "mask": mask,
    }


@router.post("/v1/inputs", status_code=201, openapi_extra={"requestBody": UPLOAD_BODY})
async def create_input(request: Request, mask: bool = Query(default=False)) -> JSONResponse:
    """Upload an image (or, with `mask=true`, a mask): its URI, for a spec's image fields."""
    who = await run_in_threadpool(require, request, "submit")
    data = await read_body(request, MAX_UPLOAD_BYTES)
    out = await run_in_threadpool(upload, request.app.state.ctx, who, data, mask)
    return JSONResponse(out, status_code=201)
