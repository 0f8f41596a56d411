"""`farm dashboard`: its JSON API and file route over a real farm, and the page as headless
Chromium renders it.

One embedded farm for the module (a real worker subprocess, a private key prefix, a local
store) runs two tiny inpaint jobs and a two-job batch; the dashboard (the API's app, read-only,
the operator's view) runs as `farm dashboard` in a subprocess (the Chromium tests) or on
uvicorn in a thread (the API tests).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from farm import Farm, Inpaint
from farm.api.app import create_app
from farm.api.auth import OPERATOR
from farm.api.dashboard_data import DashboardData
from farm.api.server import in_thread
from farm.batches.submit import submit_batch
from farm.cli.demo import box_mask, sample_image
from farm.jobs.record import JobRecord
from farm.local.up import LocalFarm
from farm.queue.app import enqueue
from farm.queue.routing import RENDER_QUEUE
from farm.settings import FarmSettings, settings_env
from farm.state.reconciler import reconcile
from tests.support.raw import raw

STEPS = 2
WINDOW = (1280, 900)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    # No --virtual-time-budget: the page follows server-sent events, so the network never
    # goes idle and no budget would end; the server puts the page's first data in the page.
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
]


@pytest.fixture(scope="module")
def farm_settings(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard-farm")
    settings = FarmSettings(
        redis_url=redis_server.url,
        storage=(tmp / "store").as_uri(),
        home=tmp,
        key_prefix=f"dash{uuid.uuid4().hex[:8]}:",
    )
    with LocalFarm(settings, workers=1, threads=1, preload=["tiny-inpaint"]) as lf:
        yield lf.settings, lf.procs[0].pid


@pytest.fixture(scope="module")
def worked(farm_settings, tmp_path_factory):
    """Two inpaint jobs and a batch of two, all done; the worker's registry entry."""
    settings, pid = farm_settings
    data = tmp_path_factory.mktemp("dashboard-data")
    for i in (1, 2):
        sample_image(i).save(data / f"img{i}.png")
        box_mask(i).save(data / f"mask{i}.png")
    rows = [{"image": f"img{i}.png", "mask": "box", "label": f"l{i}"} for i in (1, 2)]
    head = {"defaults": {"model": "tiny-inpaint", "num_inference_steps": STEPS, "prompt": "p"}}
    manifest = data / "shots.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [head, *rows]) + "\n")
    with Farm(settings) as farm:
        jobs = [
            farm.submit(
                Inpaint(
                    model="tiny-inpaint",
                    prompt=f"a house {i}",
                    image=str(data / f"img{i}.png"),
                    mask_image=str(data / f"mask{i}.png"),
                    seed=i,
                    num_inference_steps=STEPS,
                )
            )
            for i in (1, 2)
        ]
        submit_batch(farm, manifest, "shots")
        farm.wait([j.id for j in jobs], timeout=180, raise_on_failure=True)
        from farm.batches.batch import Batch

        assert Batch(farm, "shots").wait(timeout=180).all_succeeded
        # A batched job's own message is acknowledged later as a no-op: let the queue drain.
        r, lists = raw(farm), f"{settings.key_prefix}celery:{RENDER_QUEUE}*"
        deadline = time.monotonic() + 60
        while any(r.llen(k) for k in r.keys(lists)) and time.monotonic() < deadline:
            time.sleep(0.1)
        # The worker's own registry entry, once it counts the four jobs.
        while time.monotonic() < deadline:
            entries = farm.tracker.workers.read()
            if entries and entries[0].jobs_done >= 4 and entries[0].job is None:
                break
            time.sleep(0.1)
        worker = entries[0]
        assert worker.pid == pid and "tiny-inpaint" in worker.models, entries
        yield [j.id for j in jobs], worker


class Served:
    """Where a dashboard in a thread listens."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
        self.server_address = (host, int(port))


@pytest.fixture(scope="module")
def api(farm_settings, worked):
    """The dashboard in a thread of this process, on a free loopback port."""
    with (
        Farm(farm_settings[0]) as farm,
        in_thread(create_app(farm_settings[0], anonymous=OPERATOR)) as url,
    ):
        yield Served(url), farm


def get(server, path: str, method: str = "GET") -> tuple[int, bytes, dict]:
    """A raw request: the path goes out exactly as written (urllib would normalise `..`)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.headers  # case-insensitive, as HTTP headers are
    finally:
        conn.close()


# --------------------------------------------------------------------------- the API


def test_overview_lists_queues_workers_batches_and_jobs(api, worked):
    server, farm = api
    job_ids, worker = worked
    status, body, headers = get(server, "/api/overview")
    assert status == 200 and headers["Content-Type"] == "application/json"
    data = json.loads(body)
    queues = {"render", "finetune", *worker.queues}  # its model's affinity queue too
    assert {q["name"]: q["depth"] for q in data["queues"]} == dict.fromkeys(queues, 0)
    assert [w["name"] for w in data["workers"]] == [worker.name]
    assert data["workers"][0]["online"] is True and data["workers"][0]["pid"] == worker.pid
    (batch,) = data["batches"]
    assert batch["name"] == "shots" and batch["counts"] == {"succeeded": 2}
    assert batch["ended"] == batch["total"] == 2 and batch["images_done"] == 2
    listed = {j["id"]: j for j in data["jobs"]}
    assert set(job_ids) <= set(listed) and len(listed) == 4
    # A reconciler pass drops ended jobs from the live index; the page still lists them.
    reconcile(farm.tracker, farm.celery, requeue_after=60)
    assert raw(farm).zcard(farm.tracker.keys.jobs) == 0
    again = json.loads(get(server, "/api/overview")[1])
    assert [j["id"] for j in again["jobs"]] == [j["id"] for j in data["jobs"]]
    for j in listed.values():
        assert j["state"] == "succeeded"
        status, png, headers = get(server, j["thumb"])
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_job_api_serves_input_mask_and_outputs_from_the_store(api, worked):
    server, farm = api
    job_id = worked[0][0]
    status, body, _ = get(server, f"/api/job/{job_id}")
    assert status == 200
    job = json.loads(body)
    rec = farm.get(job_id)
    images = job["images"]
    wanted = {
        images["image"]: rec.spec["image"],
        images["mask"]: rec.mask,
        images["outputs"][0]: rec.outputs[0],
    }
    assert len(images["outputs"]) == len(rec.outputs) == 1
    for url, uri in wanted.items():
        assert url.startswith("/files/")
        status, data, headers = get(server, url)
        assert status == 200 and data == farm.store.get_uri(uri)
        assert headers["Cache-Control"] == "private, max-age=300"  # stored objects never change
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert get(server, f"/api/job/{job_id}")[2]["Cache-Control"] == "no-store"


def test_queue_depth_counts_every_priority_list(redis_server, tmp_path):
    """Messages at three priorities land in three kombu lists; the depth is their sum."""
    settings = FarmSettings(
        redis_url=redis_server.url,
        storage=(tmp_path / "store").as_uri(),
        home=tmp_path,
        key_prefix=f"depth{uuid.uuid4().hex[:8]}:",
    )
    with Farm(settings) as farm:
        enqueue(farm.celery, [("a", RENDER_QUEUE, 0), ("b", RENDER_QUEUE, 5)])
        enqueue(farm.celery, [("c", RENDER_QUEUE, 9), ("d", RENDER_QUEUE, 9)])
        (render,) = DashboardData(farm).queue_depths([RENDER_QUEUE])
        lists = raw(farm).keys(f"{settings.key_prefix}celery:{RENDER_QUEUE}*")
    assert render["depth"] == 4 and len(render["by_step"]) == 3 == len(lists)


@pytest.mark.parametrize(
    "path",
    [
        "/files/../x",
        "/files/%2e%2e/%2e%2e/etc/passwd",
        "/files/jobs/../../etc/passwd",
        "/files//etc/passwd",
        "/files/up.json",
        "/files/logs/worker-0.log",
        "/files/jobs/a%00b/out/0.png",
        "/api/job/..%2f..%2fx",
    ],
)
def test_paths_outside_the_served_prefixes_are_refused(api, path):
    status, body, _ = get(api[0], path)
    assert status == 400, body


def test_missing_things_are_404_and_writes_405(api):
    server, farm = api
    assert get(server, "/files/inputs/" + "0" * 64 + ".png")[0] == 404
    assert get(server, f"/api/job/{uuid.uuid4().hex}")[0] == 404
    assert get(server, "/etc/passwd")[0] == 404
    status, _, headers = get(server, "/api/overview", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_foreign_uris_get_no_url(api):
    data = DashboardData(api[1])
    assert data.file_url("s3://someone-else/jobs/x/out/0.png") is None
    assert data.file_url("file:///etc/passwd") is None
    assert data.file_url(api[1].store.uri("logs/x.png")) is None
    assert data.file_url(api[1].store.uri("jobs/x/out/0.png")) == "/files/jobs/x/out/0.png"


def test_only_image_outputs_become_thumbnails(api):
    """A fine-tune's outputs are an adapter and its logs: links, never an <img>."""
    farm = api[1]
    adapter = farm.store.uri("adapters/abc/pytorch_lora_weights.safetensors")
    curve = farm.store.uri("adapters/abc/loss.png")
    rec = JobRecord(
        id="abc", kind="finetune", state="succeeded", spec={}, created_at=0, outputs=[adapter]
    )
    data = DashboardData(farm)
    assert data._summary(rec)["thumb"] is None
    rec.outputs.append(curve)
    assert data._summary(rec)["thumb"] == "/files/adapters/abc/loss.png"


def test_an_unreachable_redis_is_a_503_not_a_dropped_connection(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    settings = FarmSettings(redis_url=dead, storage=(tmp_path / "s").as_uri())
    with in_thread(create_app(settings, anonymous=OPERATOR)) as url:
        server = Served(url)
        status, body, _ = get(server, "/api/overview")
        assert status == 503 and body.startswith(b"farm unavailable")
        assert get(server, "/")[0] == 200  # the page itself still loads


# --------------------------------------------------------------------------- in Chromium


def chromium() -> str:
    """Debian's chromium; in CI (`CI` set) a missing one is a failure, elsewhere a skip."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium); CI installs it")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard_url(farm_settings, worked, tmp_path_factory):
    """`farm dashboard` as a user runs it, in a subprocess."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm", "dashboard", "--port", str(port)],
        env=settings_env(farm_settings[0]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"farm dashboard: http://127.0.0.1:{port}/", line
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(10)


def run_chromium(url: str, tmp: Path, *args: str) -> str:
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_front_page_in_chromium(dashboard_url, worked, tmp_path):
    job_ids, worker = worked
    dom = run_chromium(dashboard_url, tmp_path, "--dump-dom")
    assert 'data-loaded="1"' in dom, dom[-2000:]
    for job_id in job_ids:
        assert f'data-job="{job_id}"' in dom and job_id in dom
    assert f'data-worker="{worker.name}"' in dom and "online" in dom
    assert 'data-batch="shots"' in dom and "2/2" in dom and "succeeded 2" in dom
    assert dom.count('class="thumb"') == 4 and dom.count('src="/files/jobs/') == 4

    shot = tmp_path / "front.png"
    run_chromium(dashboard_url, tmp_path, f"--screenshot={shot}")
    img = Image.open(shot).convert("RGB")
    assert img.size == WINDOW
    colours = img.getcolors(maxcolors=1 << 20)
    assert len(colours) > 500, "a blank or unstyled page"
    # The thumbnails are really drawn: most of an output's colours appear in the screenshot
    # (drawn `image-rendering: pixelated`, so scaling keeps its exact colours).
    with urllib.request.urlopen(dashboard_url + "api/overview") as resp:
        thumb = json.load(resp)["jobs"][0]["thumb"]
    with urllib.request.urlopen(dashboard_url.rstrip("/") + thumb) as resp:
        output = Image.open(resp).convert("RGB")
    theirs = {c for _, c in output.getcolors(maxcolors=1 << 16)}
    shown = {c for _, c in colours}
    assert len(theirs & shown) > 0.5 * len(theirs), (len(theirs & shown), len(theirs))


def test_job_page_in_chromium(dashboard_url, worked, tmp_path):
    job_id = worked[0][1]
    url = f"{dashboard_url}?job={job_id}"
    dom = run_chromium(url, tmp_path, "--dump-dom")
    assert 'data-loaded="1"' in dom and job_id in dom and "a house 2" in dom
    for caption in ("input", "mask", "output 0"):
        assert f"<figcaption>{caption}</figcaption>" in dom
    assert dom.count('src="/files/') == 3
    shot = tmp_path / "job.png"
    run_chromium(url, tmp_path, f"--screenshot={shot}")
    img = Image.open(shot).convert("RGB")
    assert img.size == WINDOW and len(img.getcolors(maxcolors=1 << 20)) > 500
