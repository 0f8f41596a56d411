"""schemathesis fuzzes every route of the OpenAPI spec against the live server: no 5xx, ever,
and a refused request (4xx) writes nothing to Redis or storage.

A farm without workers (nothing changes behind the requests' backs), the app on uvicorn, an
admin token (every route reachable). Examples are bounded so the run stays well under two
minutes on two cores.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from farm.api.app import create_app
from farm.api.server import in_thread
from farm.client import Farm
from tests.api.conftest import farm_settings, make_tokens, png
from tests.support.raw import raw

pytestmark = pytest.mark.slow

EXAMPLES = 12
"""Examples per operation (16 operations)."""


@pytest.fixture(scope="module")
def live(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-fuzz")
    s = farm_settings(redis_server, tmp)
    with Farm(s) as farm, in_thread(create_app(s)) as url:
        tokens = make_tokens(farm)
        farm.tracker.tenants.session_key()
        yield url, farm, tokens


def fingerprint(farm: Farm) -> tuple:
    r = raw(farm)
    keys = sorted(r.keys(f"{farm.settings.key_prefix}*"))
    return [(k, r.execute_command("DEBUG", "DIGEST-VALUE", k)) for k in keys], sorted(
        farm.store.list("")
    )


def test_no_route_errors_and_refusals_write_nothing(live):
    url, farm, tokens = live
    schema = schemathesis.openapi.from_url(url + "openapi.json")
    headers = {"Authorization": f"Bearer {tokens['admin']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 16
    tried: dict[str, int] = {}

    for op in operations:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy())
        def call(case) -> None:
            if case.path == "/v1/inputs" and case.method.upper() == "POST" and not case.body:
                case.body = png()
            before = fingerprint(farm)
            resp = case.call(base_url=url.rstrip("/"), headers=headers, timeout=30)
            tried[f"{case.method.upper()} {case.path}"] = (
                tried.get(f"{case.method.upper()} {case.path}", 0) + 1
            )
            assert resp.status_code < 500, (
                case.as_curl_command(),
                resp.status_code,
                resp.text[:500],
            )
            if resp.status_code >= 400:
                after = fingerprint(farm)
                assert after == before, (case.as_curl_command(), resp.status_code, resp.text[:300])

        call()
    assert len(tried) == len(operations), tried
    assert sum(tried.values()) >= 5 * len(operations), tried
