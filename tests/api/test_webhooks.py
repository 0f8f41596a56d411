"""Webhooks: signed, retried while the receiver is down, at least once under one event id, never
sent to refused addresses. The sender is the real `python -m farm.api.sender` process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from farm.api.app import create_app
from farm.api.server import in_thread
from farm.api.webhooks import backoff, check_url, verify
from farm.client import Farm
from farm.errors import InvalidJob
from farm.settings import settings_env
from tests.api.conftest import Api, make_tokens, wait_done
from tests.support.cli import run_cli


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on loopback that answers `fail_first` requests with 503."""

    daemon_threads = True

    def __init__(self, port: int, fail_first: int = 0) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first

        class Handler(BaseHTTPRequestHandler):
            def do_POST(inner) -> None:  # noqa: N802, N805
                body = inner.rfile.read(int(inner.headers["Content-Length"]))
                self.got.append((dict(inner.headers), body))
                inner.send_response(503 if len(self.got) <= self.fail_first else 200)
                inner.end_headers()

            def log_message(inner, *a) -> None:  # noqa: N805
                pass

        super().__init__(("127.0.0.1", port), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def wait_for(self, n: int = 1, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < deadline:
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sender(settings) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "farm.api.sender"],
        env=settings_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextmanager
def receiving(settings) -> Iterator[tuple[Receiver, str]]:
    """A receiver on a free loopback port (and its URL) and the webhook sender, both stopped
    after."""
    port = free_port()
    receiver = Receiver(port)
    sender = start_sender(settings)
    try:
        yield receiver, f"http://127.0.0.1:{port}"
    finally:
        sender.terminate()
        sender.wait(10)
        receiver.shutdown()


def delivery(api: Api, client, job_id: str, until, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hook = client.get(f"/v1/jobs/{job_id}").json().get("webhook") or {}
        if until(hook):
            return hook
        time.sleep(0.1)
    raise AssertionError(f"webhook of {job_id}: {hook}")


def test_webhooks_are_signed_retried_while_the_receiver_is_down_and_delivered_once(api):
    port = free_port()  # nobody listens yet: the receiver is down
    sender = start_sender(api.settings)
    try:
        with api.client() as c:
            job_id = c.post(
                "/v1/jobs",
                json={
                    "kind": "txt2img",
                    "model": "tiny",
                    "prompt": "hook",
                    "num_inference_steps": 2,
                    "height": 32,
                    "width": 32,
                    "webhook": f"http://127.0.0.1:{port}/hook",
                },
            ).json()["id"]
            wait_done(c, job_id)
            hook = delivery(api, c, job_id, lambda h: len(h.get("attempts", [])) >= 2)
            assert hook["outcome"] == "pending" and all("error" in a for a in hook["attempts"])
            receiver = Receiver(port, fail_first=1)  # back, but its first answer is a 503
            try:
                hook = delivery(api, c, job_id, lambda h: h.get("outcome") == "delivered")
            finally:
                receiver.shutdown()
    finally:
        sender.terminate()
        sender.wait(10)
    attempts = hook["attempts"]
    assert [a.get("status") for a in attempts[-2:]] == [503, 200]
    # backoff: never sooner than the doubling schedule (the sender's polling may add to a gap)
    gaps = [b["at"] - a["at"] for a, b in zip(attempts, attempts[1:], strict=False)]
    s = api.settings
    schedule = [
        backoff(n, s.webhook_backoff, s.webhook_backoff_max) for n in range(1, len(gaps) + 1)
    ]
    assert all(gap >= 0.95 * due for gap, due in zip(gaps, schedule, strict=True)), (gaps, schedule)
    assert len(receiver.got) == 2
    secret = api.farm.tracker.tenants.webhook_secret("acme")
    ids = set()
    for headers, body in receiver.got:
        assert verify(secret, body, headers["X-Farm-Signature"])
        assert not verify("whsec_wrong", body, headers["X-Farm-Signature"])
        ids.add(headers["X-Farm-Event-Id"])
        event = json.loads(body)
        assert event["type"] == "job.succeeded" and event["job"]["id"] == job_id
        assert event["job"]["outputs"] and event["id"] == headers["X-Farm-Event-Id"]
    assert ids == {hook["event_id"]}  # at least once, one stable event id


def test_a_batch_webhook_arrives_once_the_batch_settles(api):
    with receiving(api.settings) as (receiver, url), api.client() as c:
        made = c.post(
            "/v1/batches",
            json={
                "name": "hooked",
                "webhook": f"{url}/b",
                "defaults": {
                    "model": "tiny",
                    "num_inference_steps": 1,
                    "height": 32,
                    "width": 32,
                },
                "rows": [{"prompt": "a"}, {"prompt": "b"}],
            },
        )
        assert made.status_code == 201, made.text
        receiver.wait_for(1)
    ((headers, body),) = receiver.got
    event = json.loads(body)
    assert event["type"] == "batch.settled" and event["batch"]["name"] == "hooked"
    assert event["batch"]["counts"] == {"succeeded": 2}


def test_farm_batch_submit_names_a_batch_webhook_and_refuses_a_bad_one_writing_nothing(
    api, tmp_path
):
    """`farm batch submit --webhook URL`: the batch's settling is POSTed once, as for a batch
    submitted over the API; a URL the farm never posts to, or a bad manifest, leaves no
    webhook and no batch behind."""
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    flags = ("--model", "tiny", "--steps", 1, "--width", 32, "--height", 32)
    hooks = api.farm.tracker.tenants

    bad = run_cli(api.settings, "batch", "submit", manifest, "--name", "nohook", *flags,
                  "--webhook", "ftp://hooks.example.com/b")  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert "--webhook: must be an http:// or https:// URL" in bad.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "steps": "many"}\n')
    res = run_cli(api.settings, "batch", "submit", broken, "--name", "nohook", *flags,
                  "--webhook", "http://127.0.0.1:9/b")  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert hooks.batch_webhook("nohook") is None
    assert api.farm.tracker.batches.meta("nohook") is None

    with receiving(api.settings) as (receiver, url):
        res = run_cli(api.settings, "batch", "submit", manifest, "--name", "cli-hooked", *flags,
                      "--webhook", f"{url}/b")  # fmt: skip
        assert res.returncode == 0, res.stderr
        receiver.wait_for(1)
    ((headers, body),) = receiver.got
    event = json.loads(body)
    assert event["type"] == "batch.settled" and event["batch"]["name"] == "cli-hooked"
    assert event["batch"]["counts"] == {"succeeded": 2}
    assert verify(api.farm.tracker.tenants.webhook_secret("default"), body,
                  headers["X-Farm-Signature"])  # fmt: skip


def test_webhooks_to_refused_addresses_are_never_sent(api_farm, tmp_path):
    """With private addresses refused (the default): the API refuses such a URL at submit, and
    the sender refuses to post to one that got in another way (the SDK over Redis)."""
    settings = api_farm.model_copy(update={"webhook_allow_private": False})
    port = free_port()
    receiver = Receiver(port)
    farm = Farm(settings)
    tokens = make_tokens(farm)
    with in_thread(create_app(settings)) as url:
        api = Api(url, settings, farm, tokens)
        with api.client() as c:
            for host in ("127.0.0.1", "localhost", "10.1.2.3", "[::1]", "169.254.169.254"):
                resp = c.post(
                    "/v1/jobs",
                    json={
                        "kind": "txt2img",
                        "model": "tiny",
                        "prompt": "x",
                        "webhook": f"http://{host}:{port}/",
                    },
                )
                assert resp.status_code == 422 and resp.json()["field"] == "webhook", resp.text
            job = farm.submit(
                {
                    "kind": "txt2img",
                    "model": "tiny",
                    "prompt": "x",
                    "num_inference_steps": 1,
                    "height": 32,
                    "width": 32,
                    "webhook": f"http://localhost:{port}/",
                }
            )
            job.wait(timeout=120)
            sender = start_sender(settings)
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    d = farm.tracker.webhooks.get(f"job.{job.id}")
                    if d and d["outcome"] != "pending":
                        break
                    time.sleep(0.1)
            finally:
                sender.terminate()
                sender.wait(10)
    receiver.shutdown()
    farm.close()
    assert d["outcome"] == "refused" and "not a public address" in d["attempts"][0]["error"]
    assert receiver.got == []


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/", "http://[::ffff:127.0.0.1]/", "http://192.168.0.1/", "http://0.0.0.0/"],
)
def test_private_addresses_are_refused_unless_allowed(url):
    with pytest.raises(InvalidJob, match="not a public address"):
        check_url(url, allow_private=False)
    assert check_url(url, allow_private=True)
