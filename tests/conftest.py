"""Shared fixtures: real servers on loopback, started once per session.

redis_server   a private redis-server (AOF on) for the whole session
redis_url      its URL, flushed before each test
aws_env        dummy AWS credentials and region (no real account is ever reachable)
s3_server      moto's S3 in server mode over HTTP (started only by tests that need it)
settings       FarmSettings for each storage backend: ["local", "s3"] (fresh bucket/folder)
store          the ObjectStore those settings open
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator

import pytest

# Hermetic: nothing reaches the network, and the developer's own FARM_* settings stay out.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
for _name in [n for n in os.environ if n.startswith("FARM_")]:
    del os.environ[_name]

from farm.local.embedded import RedisServer  # noqa: E402
from farm.settings import FarmSettings  # noqa: E402
from farm.storage import ObjectStore, open_store  # noqa: E402
from farm.storage.s3 import S3Store  # noqa: E402
from tests.support.s3_server import AWS_TEST_ENV, S3Server  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis"), appendonly=True) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    client = redis_server.client()
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    """Dummy AWS credentials and region for the session; the developer's ~/.aws stays out."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_TEST_ENV.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def s3_server(aws_env: None) -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


def bucket_for(request: pytest.FixtureRequest) -> str:
    """A valid, unique bucket name from the test's id."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]
    return f"t-{slug}-{digest}"


@pytest.fixture(params=["local", "s3"])
def settings(request: pytest.FixtureRequest, redis_url: str, tmp_path) -> FarmSettings:
    home = tmp_path / "home"
    if request.param == "local":
        storage = (tmp_path / "storage").as_uri()
        return FarmSettings(redis_url=redis_url, storage=storage, home=home)
    s3: S3Server = request.getfixturevalue("s3_server")
    bucket = bucket_for(request)
    S3Store(bucket, endpoint_url=s3.endpoint_url, region="us-east-1").ensure_bucket()
    return FarmSettings(
        redis_url=redis_url,
        storage=f"s3://{bucket}/farm",
        s3_endpoint_url=s3.endpoint_url,
        s3_region="us-east-1",
        home=home,
    )


@pytest.fixture
def store(settings: FarmSettings) -> ObjectStore:
    return open_store(settings)
