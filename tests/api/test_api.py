"""The HTTP API over a real farm: curl, server-sent events, tenants, tokens, limits, refusals.

A real uvicorn server on a free loopback port, a real Redis, a real worker subprocess.
"""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from farm.errors import InvalidJob
from farm.jobs.specs import parse_spec
from tests.api.conftest import png, upload, wait_done
from tests.support.cli import run_cli
from tests.support.raw import raw


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "60", *args], capture_output=True, timeout=90
    )


def test_a_job_submitted_with_curl_succeeds_and_its_outputs_download(api, tmp_path):
    auth = f"Authorization: Bearer {api.tokens['acme']}"
    (tmp_path / "in.png").write_bytes(png("blue"))
    up = curl(
        "-H",
        auth,
        "--data-binary",
        f"@{tmp_path / 'in.png'}",
        "-H",
        "Content-Type: image/png",
        api.url + "v1/inputs",
    )
    uri = json.loads(up.stdout)["uri"]
    spec = {
        "kind": "img2img",
        "model": "tiny",
        "prompt": "a fox",
        "image": uri,
        "seed": 3,
        "num_inference_steps": 2,
        "strength": 0.5,
    }
    made = curl(
        "-H",
        auth,
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(spec),
        api.url + "v1/jobs",
    )
    job_id = json.loads(made.stdout)["id"]
    # The events stream ends with the job: curl -N reads it to the end.
    events = curl("-N", "-H", auth, api.url + f"v1/jobs/{job_id}/events").stdout.decode()
    states = [
        json.loads(line[6:])["state"]
        for line in events.splitlines()
        if line.startswith("data: ") and '"state"' in line
    ]
    assert states[-1] == "succeeded", events
    listed = json.loads(curl("-H", auth, api.url + f"v1/jobs/{job_id}/outputs").stdout)
    names = [o["name"] for o in listed["outputs"]]
    assert names == ["0.png", "meta.json"]
    got = curl("-H", auth, "-o", str(tmp_path / "0.png"), listed["outputs"][0]["url"])
    assert got.returncode == 0
    # The very bytes the SDK downloads.
    api.farm.download(job_id, tmp_path / "sdk")
    assert (tmp_path / "0.png").read_bytes() == (tmp_path / "sdk" / "0.png").read_bytes()


def sse_events(resp: httpx.Response, n: int | None = None) -> list[tuple[str | None, str, dict]]:
    """(id, event, data) of each event until the stream ends (or `n` events)."""
    out, eid, name, data = [], None, None, None
    for line in resp.iter_lines():
        if line.startswith("id: "):
            eid = line[4:]
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and name:
            out.append((eid, name, data))
            eid = name = data = None
            if n is not None and len(out) == n:
                break
    return out


def test_events_arrive_in_order_and_resume_after_a_dropped_connection(api):
    with api.client() as c:
        # Behind a slow job, so ours is seen queued first.
        blocker = c.post(
            "/v1/jobs",
            json={
                "kind": "txt2img",
                "model": "tiny",
                "prompt": "slow",
                "num_inference_steps": 30,
                "height": 64,
                "width": 64,
            },
        ).json()["id"]
        job_id = c.post(
            "/v1/jobs",
            json={
                "kind": "txt2img",
                "model": "tiny",
                "prompt": "x",
                "num_inference_steps": 8,
                "height": 32,
                "width": 32,
                "seed": 1,
            },
        ).json()["id"]
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
            ((first_id, name, data),) = sse_events(resp, 1)
        assert name == "state" and data["state"] == "queued" and first_id
        wait_done(c, job_id)
        with c.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": first_id}
        ) as resp:
            rest = sse_events(resp)
        states = [d["state"] for _, n, d in rest if n == "state"]
        assert states == ["running", "succeeded"], rest
        ids = [i for i, n, _ in rest if n == "state"]
        assert all(ids) and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        assert rest[-1][2]["outputs"]  # the last event carries the record
        wait_done(c, blocker)


def test_progress_events_while_running(api):
    with api.client() as c:
        job_id = c.post(
            "/v1/jobs",
            json={
                "kind": "txt2img",
                "model": "tiny",
                "prompt": "y",
                "num_inference_steps": 40,
                "height": 64,
                "width": 64,
            },
        ).json()["id"]
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
            events = sse_events(resp)
    steps = [d["step"] for _, n, d in events if n == "progress"]
    assert steps and steps == sorted(steps) and max(steps) <= 40
    assert [d["state"] for _, n, d in events if n == "state"][-1] == "succeeded"


def test_tenants_cannot_see_each_others_jobs_batches_inputs_or_outputs(api):
    acme, beta = api.client("acme"), api.client("beta")
    uri = upload(acme, png("green"))
    job_id = acme.post(
        "/v1/jobs",
        json={
            "kind": "img2img",
            "model": "tiny",
            "prompt": "p",
            "image": uri,
            "num_inference_steps": 2,
        },
    ).json()["id"]
    made = acme.post(
        "/v1/batches",
        json={
            "name": "mine",
            "defaults": {"model": "tiny", "num_inference_steps": 2},
            "rows": [{"image": uri, "prompt": "q"}],
        },
    )
    assert made.status_code == 201, made.text
    wait_done(acme, job_id)
    assert acme.get(f"/v1/jobs/{job_id}/outputs/0.png").status_code == 200
    nobody = "0" * 32
    for method, path in [
        ("GET", "/v1/jobs/{}"),
        ("DELETE", "/v1/jobs/{}"),
        ("GET", "/v1/jobs/{}/outputs"),
        ("GET", "/v1/jobs/{}/outputs/0.png"),
        ("GET", "/v1/jobs/{}/outputs/meta.json"),
        ("GET", "/v1/jobs/{}/events"),
    ]:
        theirs = beta.request(method, path.format(job_id))
        missing = beta.request(method, path.format(nobody))
        assert theirs.status_code == missing.status_code == 404, (path, theirs.text)
        assert theirs.json()["detail"].replace(job_id, nobody) == missing.json()["detail"]
    for method, path in [
        ("GET", "/v1/batches/mine"),
        ("POST", "/v1/batches/mine/retry"),
        ("POST", "/v1/batches/mine/cancel"),
        ("GET", "/v1/jobs?batch=mine"),
    ]:
        assert beta.request(method, path).status_code == 404, path
    assert job_id not in {j["id"] for j in beta.get("/v1/jobs").json()["jobs"]}
    assert job_id in {j["id"] for j in acme.get("/v1/jobs").json()["jobs"]}
    assert "mine" not in beta.get("/v1/batches").json()["batches"]
    assert acme.get("/v1/jobs?batch=mine").json()["jobs"]  # its batch's jobs are acme's
    # Inputs and outputs by URI: refused with the message of an input nobody uploaded.
    rec = acme.get(f"/v1/jobs/{job_id}").json()
    for value in (uri, rec["outputs"][0]):
        spec = {"kind": "img2img", "model": "tiny", "prompt": "p", "image": value}
        resp = beta.post("/v1/jobs", json=spec)
        assert resp.status_code == 422 and resp.json()["field"] == "image"
        assert "no such input" in resp.json()["detail"]
    lora = beta.post(
        "/v1/jobs",
        json={"kind": "txt2img", "model": "tiny", "prompt": "p", "loras": [f"job:{job_id}"]},
    )
    assert lora.status_code == 422 and "no such job" in lora.json()["detail"]
    # The same picture uploaded by beta is beta's too: same URI, now nameable by beta.
    assert upload(beta, png("green")) == uri
    assert (
        beta.post(
            "/v1/jobs",
            json={
                "kind": "img2img",
                "model": "tiny",
                "prompt": "p",
                "image": uri,
                "num_inference_steps": 2,  # at img2img's 0.8 strength: one denoising step
            },
        ).status_code
        == 201
    )
    # The dashboard, logged in as beta: none of acme's files.
    login = httpx.post(
        api.url + "login", data={"token": api.tokens["beta"]}, follow_redirects=False
    )
    cookies = {"farm_session": login.cookies["farm_session"]}
    key = rec["outputs"][0].split("/store/", 1)[1]
    assert httpx.get(api.url + "files/" + key, cookies=cookies).status_code == 404
    assert httpx.get(api.url + f"api/job/{job_id}", cookies=cookies).status_code == 404
    login = httpx.post(
        api.url + "login", data={"token": api.tokens["acme"]}, follow_redirects=False
    )
    mine = {"farm_session": login.cookies["farm_session"]}
    assert httpx.get(api.url + "files/" + key, cookies=mine).status_code == 200


def test_scopes_and_missing_tokens(api):
    assert httpx.get(api.url + "v1/jobs").status_code == 401
    assert (
        httpx.get(api.url + "v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    )
    with api.client("reader") as reader:
        assert reader.get("/v1/jobs").status_code == 200
        resp = reader.post("/v1/jobs", json={"kind": "txt2img", "model": "tiny", "prompt": "x"})
        assert resp.status_code == 403
        assert reader.get("/v1/workers").status_code == 403
    with api.client("admin") as admin:
        workers = admin.get("/v1/workers").json()["workers"]
        assert workers and workers[0]["online"]
    assert httpx.get(api.url + "healthz").status_code == 200
    assert httpx.get(api.url + "readyz").json() == {"ok": True}


def test_a_revoked_token_is_refused_at_once(api):
    made = run_cli(api.settings, "tokens", "create", "short-lived", "--tenant", "gamma", "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    listed = run_cli(api.settings, "tokens", "list")
    assert "short-lived" in listed.stdout and token not in listed.stdout
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=api.url, headers=headers) as c:
        assert c.get("/v1/jobs").status_code == 200
        assert run_cli(api.settings, "tokens", "revoke", "short-lived").returncode == 0
        assert c.get("/v1/jobs").status_code == 401
    raw = api.farm.tracker.tenants
    assert all(token.split("_")[2] not in json.dumps(t.__repr__()) for t in raw.tokens())


def test_limits_give_429_with_retry_after_and_413(api):
    assert (
        run_cli(
            api.settings, "tokens", "limits", "delta", "--jobs-per-minute", "3", "--max-images", "2"
        ).returncode
        == 0
    )
    token = api.farm.tracker.tenants.create_token("delta-ci", "delta", ["submit", "read"])[1]
    spec = {"kind": "txt2img", "model": "tiny", "prompt": "x", "num_inference_steps": 1}
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {token}"}) as c:
        big = c.post("/v1/jobs", json={**spec, "num_images_per_prompt": 3})
        assert big.status_code == 413 and big.json()["field"] == "num_images_per_prompt"
        assert c.post("/v1/jobs:batch", json={"jobs": [spec] * 4}).status_code == 413
        assert [c.post("/v1/jobs", json=spec).status_code for _ in range(3)] == [201] * 3
        over = c.post("/v1/jobs", json=spec)
        assert over.status_code == 429 and 1 <= int(over.headers["Retry-After"]) <= 20
        # Queued-jobs limit: delta has 3 jobs not yet ended.
        run_cli(
            api.settings, "tokens", "limits", "delta", "--jobs-per-minute", "0", "--max-queued", "3"
        )
        ids = [j["id"] for j in c.get("/v1/jobs").json()["jobs"]]
        deadline = time.monotonic() + 3  # a limit's change holds within a second (limits_of)
        while True:
            queued = c.post("/v1/jobs", json=spec)
            if "per minute" not in queued.text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if queued.status_code == 429:  # none ended yet
            assert "not yet ended" in queued.json()["detail"]
        for job_id in ids:
            wait_done(c, job_id)
        assert c.post("/v1/jobs", json=spec).status_code == 201  # ended ones no longer count


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "txt2img", "model": "tiny", "prompt": "fox", "width": 100},
        {"kind": "txt2img", "model": "tiny", "prompt": "  "},
        {"kind": "txt2img", "model": "tiny", "prompt": "fox", "scheduler": "nope"},
        {"kind": "txt2img", "model": "../etc", "prompt": "fox"},
        {"kind": "inpaint", "model": "tiny-inpaint", "prompt": "fox"},
        {"kind": "txt2img", "model": "tiny", "prompt": "fox", "num_inference_steps": 0},
        {"kind": "txt2img", "model": "tiny", "prompt": "fox", "webhook": "ftp://x"},
        {"kind": "teleport", "model": "tiny"},
    ],
)
def test_a_spec_the_sdk_refuses_is_refused_with_the_same_message_and_nothing_written(api, spec):
    with pytest.raises(InvalidJob) as sdk:
        api.farm.submit(dict(spec))
    before = fingerprint(api)
    with api.client() as c:
        one = c.post("/v1/jobs", json=spec)
        many = c.post(
            "/v1/jobs:batch",
            json={"jobs": [{"kind": "txt2img", "model": "tiny", "prompt": "ok"}, spec]},
        )
    assert one.status_code == 422 and one.json()["detail"] == str(sdk.value)
    assert (
        many.status_code == 422
        and many.json()["detail"] == str(sdk.value)
        and many.json()["index"] == 1
    )
    assert fingerprint(api) == before
    # And the CLI says the same line.
    assert parse_spec is not None
    if spec["kind"] == "txt2img" and "width" in spec:
        cli = run_cli(
            api.settings,
            "submit",
            "txt2img",
            "--model",
            "tiny",
            "--prompt",
            "fox",
            "--width",
            "100",
        )
        assert cli.returncode == 2 and cli.stderr.strip() == f"farm: error: {one.json()['detail']}"


def test_local_paths_and_absolute_model_paths_are_refused_over_the_api(api):
    with api.client() as c:
        for spec, field in [
            ({"kind": "img2img", "model": "tiny", "prompt": "p", "image": "/etc/hosts"}, "image"),
            ({"kind": "txt2img", "model": "/models/x", "prompt": "p"}, "model"),
            (
                {
                    "kind": "txt2img",
                    "model": "tiny",
                    "prompt": "p",
                    "webhook": "http://127.0.0.1:1/",
                },
                None,
            ),
        ]:
            resp = c.post("/v1/jobs", json=spec)
            if field is None:  # this farm allows private webhooks: the form is fine
                assert resp.status_code == 201
                continue
            assert resp.status_code == 422 and resp.json()["field"] == field, resp.text


def test_idempotency_keys_are_per_tenant(api):
    spec = {
        "kind": "txt2img",
        "model": "tiny",
        "prompt": "k",
        "key": "same",
        "num_inference_steps": 1,
    }
    with api.client("acme") as a, api.client("beta") as b:
        first = a.post("/v1/jobs", json=spec)
        again = a.post("/v1/jobs", json=spec)
        other = b.post("/v1/jobs", json=spec)
        assert first.status_code == 201 and again.status_code == 200
        assert again.json()["id"] == first.json()["id"] != other.json()["id"]
        assert a.get(f"/v1/jobs/{first.json()['id']}").json()["spec"]["key"] == "same"


def fingerprint(api) -> tuple:
    """A digest of every key the farm keeps (but what workers change by themselves) and the store's
    listing, once no job is left queued or running: what a refused request must not change."""
    r = raw(api.farm)
    prefix = api.settings.key_prefix
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = [r.hget(k, "state") for k in r.keys(f"{prefix}job:*")]
        if not {"queued", "running", "waiting"} & set(states):
            break
        time.sleep(0.2)
    # Not the workers' heartbeats and the reconciler's lock, nor the live index, which the
    # reconciler prunes of ended jobs whenever its turn comes: a refused request that wrote a
    # job would show as its `job:<id>` key all the same.
    skip = tuple(f"{prefix}{k}" for k in ("workers", "reconciler", "celery", "jobs", "retries"))
    keys = sorted(k for k in r.keys(f"{prefix}*") if not k.startswith(skip))
    digests = [r.execute_command("DEBUG", "DIGEST-VALUE", k) for k in keys]
    return list(zip(keys, digests, strict=True)), sorted(api.farm.store.list(""))


def test_list_pages_newest_first(api):
    with api.client("beta") as c:
        ids = [
            c.post(
                "/v1/jobs",
                json={
                    "kind": "txt2img",
                    "model": "tiny",
                    "prompt": str(i),
                    "num_inference_steps": 1,
                },
            ).json()["id"]
            for i in range(5)
        ]
        seen, cursor = [], None
        while True:
            page = c.get(
                "/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}
            ).json()
            seen += [j["id"] for j in page["jobs"]]
            cursor = page["cursor"]
            if not cursor:
                break
        assert seen[:5] == ids[::-1] and len(seen) == len(set(seen))


def test_previews_arrive_as_events_and_change_nothing(api):
    import base64
    import io

    from PIL import Image

    spec = {
        "kind": "txt2img",
        "model": "tiny",
        "prompt": "preview",
        "seed": 9,
        "num_inference_steps": 40,
        "height": 64,
        "width": 64,
    }
    with api.client() as c:
        job_id = c.post("/v1/jobs", json={**spec, "preview_every": 5}).json()["id"]
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
            events = sse_events(resp)
        plain = c.post("/v1/jobs", json=spec).json()["id"]
        wait_done(c, plain)
        a, b = (c.get(f"/v1/jobs/{j}/outputs/0.png").content for j in (job_id, plain))
    shots = [d for _, n, d in events if n == "preview"]
    assert shots and all(d["step"] % 5 == 0 for d in shots)
    picture = Image.open(io.BytesIO(base64.b64decode(shots[-1]["png"].split(",", 1)[1])))
    assert picture.width == picture.height < 64  # the latents' size, not the image's
    assert a == b  # the same pixels with previews as without
