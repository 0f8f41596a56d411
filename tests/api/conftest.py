"""The HTTP API's fixtures: a real farm (a worker subprocess, a private key prefix), the app on
uvicorn on a free loopback port, and tokens of two tenants.

api_farm     an embedded farm with one tiny worker, for the module (local store)
api          (base URL, the farm's settings, tokens) with the app served from a thread
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass

import httpx
import pytest
from PIL import Image

from farm.api.app import create_app
from farm.api.server import in_thread
from farm.client import Farm
from farm.local.up import LocalFarm
from farm.settings import FarmSettings


@dataclass
class Api:
    url: str
    settings: FarmSettings
    farm: Farm
    tokens: dict[str, str]
    """Tenant → a submit+read token of it ("admin": an admin token of tenant acme)."""

    def client(self, tenant: str = "acme", **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)


def farm_settings(redis_server, tmp, **extra) -> FarmSettings:
    return FarmSettings(
        redis_url=redis_server.url,
        storage=extra.pop("storage", None) or (tmp / "store").as_uri(),
        home=tmp,
        key_prefix=f"api{uuid.uuid4().hex[:8]}:",
        **extra,
    )


def make_tokens(farm: Farm) -> dict[str, str]:
    tenants = farm.tracker.tenants
    return {
        "acme": tenants.create_token("acme-ci", "acme", ["submit", "read"])[1],
        "beta": tenants.create_token("beta-ci", "beta", ["submit", "read"])[1],
        "admin": tenants.create_token("acme-admin", "acme", ["admin"])[1],
        "reader": tenants.create_token("acme-reader", "acme", ["read"])[1],
    }


@pytest.fixture(scope="module")
def api_farm(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-farm")
    settings = farm_settings(redis_server, tmp, webhook_allow_private=True, webhook_backoff=0.2)
    with LocalFarm(settings, workers=1, threads=1, preload=["tiny"]) as lf:
        yield lf.settings


@pytest.fixture(scope="module")
def api(api_farm):
    farm = Farm(api_farm)
    tokens = make_tokens(farm)
    with in_thread(create_app(api_farm)) as url:
        yield Api(url, api_farm, farm, tokens)
    farm.close()


def png(colour: str = "red", size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def upload(client: httpx.Client, data: bytes, mask: bool = False) -> str:
    resp = client.post("/v1/inputs", content=data, params={"mask": mask} if mask else None)
    assert resp.status_code == 201, resp.text
    return resp.json()["uri"]


def wait_done(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = client.get(f"/v1/jobs/{job_id}").json()
        if rec["state"] in ("succeeded", "failed", "cancelled"):
            return rec
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not done: {rec}")
