"""Fixtures of the CLI tests."""

from __future__ import annotations

import uuid

import pytest

from farm.settings import FarmSettings


@pytest.fixture
def empty_farm(redis_server, tmp_path) -> FarmSettings:
    """Settings with a fresh key prefix and an empty store; no worker needed."""
    store = tmp_path / "store"
    return FarmSettings(
        redis_url=redis_server.url,
        storage=store.as_uri(),
        home=tmp_path,
        key_prefix=f"bad{uuid.uuid4().hex[:8]}:",
    )
