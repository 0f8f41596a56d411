"""Model affinity, priorities, the worker registry and each worker's metrics endpoint, with
real worker processes on a real Redis."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from farm import Farm, Txt2Img
from farm.cli.main import main as farm_main
from farm.keys import RedisKeys
from farm.local.launcher import Child, Supervisor, worker_command
from farm.queue.app import make_celery
from farm.queue.routing import Router, model_queue
from farm.settings import FarmSettings, settings_env
from farm.state.reconciler import reconcile
from farm.state.registry import WorkerInfo
from farm.submit import Submission
from tests.support.raw import raw


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(seed: int, priority: int = 0, steps: int = 2) -> Txt2Img:
    return Txt2Img(
        model="tiny",
        prompt="a fox",
        seed=seed,
        num_inference_steps=steps,
        width=32,
        height=32,
        priority=priority,
    )


def entries(farm: Farm) -> dict[str, WorkerInfo]:
    return {w.name: w for w in farm.tracker.workers.read()}


def wait_for(predicate, timeout: float = 90.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def child(name: str, settings: FarmSettings, tmp, preload=(), **env) -> Child:
    return Child(
        name,
        worker_command("cpu", 1, name=name, preload=list(preload)),
        {k: str(v) for k, v in env.items()},
        tmp / f"{name}.log",
    )


@pytest.fixture
def settings(redis_url, tmp_path) -> FarmSettings:
    return FarmSettings(
        redis_url=redis_url,
        storage=(tmp_path / "storage").as_uri(),
        home=tmp_path / "home",
        reconcile_interval=1.0,
    )


def test_jobs_go_to_the_worker_holding_their_model_and_run_without_it(settings, tmp_path):
    port = free_port()
    warm = child("warm@test", settings, tmp_path, ["tiny"], FARM_METRICS_PORT=port)
    cold = child("cold@test", settings, tmp_path)
    sup = Supervisor([warm, cold], settings_env(settings), restart=False)
    sup.start()
    try:
        with Farm(settings) as farm:
            # 1. Both advertise themselves; only the warm one holds `tiny` and consumes its queue.
            wait_for(lambda: len(entries(farm)) == 2, what="two workers")
            w = entries(farm)
            assert w["warm@test"].models == ["tiny"]
            assert w["warm@test"].queues == [model_queue("tiny"), "render"]
            assert w["cold@test"].models == [] and w["cold@test"].queues == ["render"]
            assert all(e.online() and e.device == "cpu" for e in w.values())

            # 2. Jobs for `tiny` go to its queue and all run on the warm worker.
            for i in range(4):
                rec = farm.submit(job(i)).wait(timeout=120)
                assert (rec.queue, rec.worker) == (model_queue("tiny"), "warm@test")
            # The entry is rewritten just after the job's end (what `wait` saw).
            wait_for(
                lambda: (e := entries(farm)["warm@test"]).job is None and e.jobs_done == 4,
                10,
                what="the warm worker's entry: 4 jobs done, none in hand",
            )
            assert entries(farm)["cold@test"].jobs_done == 0

            # 3. Its metrics endpoint, scraped from outside, counts what it did.
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            m = parse_metrics(text.decode())
            assert m['farm_jobs_total{kind="txt2img",state="succeeded"}'] == 4
            assert m['farm_render_seconds_count{kind="txt2img"}'] == 4
            assert m['farm_render_seconds_sum{kind="txt2img"}'] > 0
            assert m["farm_batch_size_count"] == 4 and m["farm_batch_size_sum"] == 4
            assert m["farm_pipeline_load_seconds_count"] == 1  # the preload, once
            assert m['farm_queue_depth{queue="render"}'] == 0
            assert m['farm_jobs_in_state{state="succeeded"}'] == 4  # farm-wide, from counters
            assert m['farm_jobs_in_state{state="queued"}'] == 0
            assert m[f'farm_queue_depth{{queue="{model_queue("tiny")}"}}'] == 0
            assert m['farm_device_memory_bytes{device="cpu"}'] > 10_000_000
            assert m["farm_models_warm"] == 1
            # Nothing held ahead or behind once its jobs ended (`workers.pipeline`).
            assert m['farm_worker_pipeline_bytes{side="ahead"}'] == 0
            assert m['farm_worker_pipeline_bytes{side="behind"}'] == 0

            # 4. The warm worker stops (cleanly: it withdraws). A job for `tiny` still runs.
            sup.procs[0].send_signal(signal.SIGTERM)
            assert sup.procs[0].wait(60) == 0
            assert set(entries(farm)) == {"cold@test"}
        with Farm(settings) as farm:  # a fresh client: no cached view of the workers
            rec = farm.submit(job(10)).wait(timeout=120)
            assert (rec.queue, rec.worker) == ("render", "cold@test")
            # 5. Having loaded `tiny`, the other worker now consumes its queue, first.
            wait_for(lambda: entries(farm)["cold@test"].queues[0] != "render", 30)
            assert entries(farm)["cold@test"].queues == [model_queue("tiny"), "render"]
            assert entries(farm)["cold@test"].models == ["tiny"]
        with Farm(settings) as farm:
            rec = farm.submit(job(11)).wait(timeout=120)
            assert (rec.queue, rec.worker) == (model_queue("tiny"), "cold@test")
            # Every message was acknowledged, the one whose job changed the queues included.
            unacked = f"{settings.key_prefix}celery:unacked"
            wait_for(lambda: raw(farm).hlen(unacked) == 0, 10, what="no unacked message")
    finally:
        sup.stop()
    with Farm(settings) as farm:
        assert entries(farm) == {}  # a clean exit removes the entry


def test_higher_priority_runs_first_behind_a_busy_worker(settings, tmp_path):
    settings = settings.model_copy(update={"max_batch": 1})  # one job per call: pure order
    sup = Supervisor([child("one@test", settings, tmp_path, ["tiny"])], settings_env(settings))
    sup.start()
    events = Events(make_celery(settings))
    try:
        with Farm(settings) as farm:
            wait_for(lambda: entries(farm), what="the worker")
            events.start()
            busy = farm.submit(job(0, steps=60))
            wait_for(lambda: busy.status().state.value == "running", what="the busy job")
            low = [farm.submit(job(100 + i, priority=0)).id for i in range(3)]
            high = [farm.submit(job(200 + i, priority=9)).id for i in range(3)]
            records = farm.wait([busy.id, *low, *high], timeout=180)
            assert all(r.state.value == "succeeded" for r in records)
            order = [r.id for r in sorted(records, key=lambda r: r.started_at)]
            assert order[0] == busy.id
            assert set(order[1:4]) == set(high) and set(order[4:]) == set(low)
            # Flower's view: the worker's heartbeats and its tasks' events reach the broker.
            wait_for(lambda: events.seen("worker-heartbeat", "one@test"), 10, what="heartbeat")
            wait_for(lambda: len(events.of("task-succeeded")) >= 7, 10, what="task events")
            assert events.seen("task-received", "one@test")
    finally:
        sup.stop()


class Events(threading.Thread):
    """Celery's event stream, as Flower reads it (`app.events.Receiver`)."""

    def __init__(self, app) -> None:
        super().__init__(daemon=True)
        self.app, self.got = app, []

    def run(self) -> None:
        try:
            with self.app.connection() as conn:
                receiver = self.app.events.Receiver(conn, handlers={"*": self.got.append})
                receiver.capture(limit=None, timeout=60, wakeup=False)
        except Exception:  # the test is over (timeout, or its Redis flushed away)
            pass

    def of(self, kind: str) -> list[dict]:
        return [e for e in list(self.got) if e.get("type") == kind]

    def seen(self, kind: str, hostname: str) -> bool:
        return any(e.get("hostname") == hostname for e in self.of(kind))


def test_an_evicted_models_queue_is_dropped_and_its_jobs_rerouted(settings, tmp_path):
    from PIL import Image

    from farm import Inpaint
    from farm.queue.app import enqueue

    # A cache budget this small keeps one model: loading another evicts the first.
    one = child("one@test", settings, tmp_path, ["tiny"], FARM_MODEL_CACHE_GB="0.000001")
    sup = Supervisor([one], settings_env(settings))
    sup.start()
    try:
        with Farm(settings) as farm:
            wait_for(lambda: entries(farm), what="the worker")
            assert entries(farm)["one@test"].queues == [model_queue("tiny"), "render"]
            image, mask = Image.new("RGB", (32, 32), "red"), Image.new("L", (32, 32), 255)
            spec = Inpaint(model="tiny-inpaint", prompt="x", image=image, mask_image=mask, seed=1)
            farm.submit(spec.model_copy(update={"num_inference_steps": 2})).wait(timeout=120)
            e = wait_for(lambda: (e := entries(farm)["one@test"]).models == ["tiny-inpaint"] and e)
            assert e.queues == [model_queue("tiny-inpaint"), "render"]  # render.tiny dropped
            # A job whose only message sits in the dropped queue: nobody takes it, until the
            # worker's reconciler (every second here) re-sends it to `render`.
            rec = Submission(farm).prepare(job(6)) | {"queue": model_queue("tiny")}
            farm.tracker.create([rec])
            enqueue(farm.celery, [(rec["id"], model_queue("tiny"), 0)])
            done = farm.wait([rec["id"]], timeout=120)[0]
            assert (done.state.value, done.queue, done.worker) == (
                "succeeded",
                "render",
                "one@test",
            )
            # Having loaded `tiny` for it (evicting tiny-inpaint), the worker takes its queue back.
            tiny_first = [model_queue("tiny"), "render"]
            wait_for(lambda: entries(farm)["one@test"].queues == tiny_first, 10, what="queues")
            with Farm(settings) as fresh:  # a client whose view of the registry is new
                late = fresh.submit(job(7)).wait(timeout=120)
                assert (late.queue, late.worker) == (model_queue("tiny"), "one@test")
    finally:
        sup.stop()


def test_reconciler_moves_jobs_stranded_in_a_model_queue(settings):
    keys = RedisKeys(settings.key_prefix)
    with Farm(settings) as farm:
        r = raw(farm)
        ghost = WorkerInfo(
            name="ghost@test",
            host="test",
            pid=1,
            device="cpu",
            queues=[model_queue("tiny"), "render"],
            models=["tiny"],
            started_at=time.time(),
            heartbeat=time.time(),
        )
        farm.tracker.workers.publish(ghost)
        assert Router(farm.tracker.workers.consumed_queues).queue_for(job(1)) == model_queue("tiny")
        high, low = farm.submit(job(1, priority=9)), farm.submit(job(2, priority=0))
        assert farm.tracker.queue_depths(["render", model_queue("tiny")]) == {
            "render": 0,
            model_queue("tiny"): 2,  # its priority sub-lists counted too
        }
        assert r.llen(keys.broker_queue(model_queue("tiny"))) == 1  # priority 9: kombu step 0
        # While the worker holding it is online, the jobs stay where they are.
        celery = make_celery(farm.settings)
        assert reconcile(farm.tracker, celery, requeue_after=600).rerouted == []
        # It died (no heartbeat for a minute): the reconciler re-sends them to `render`.
        farm.tracker.workers.publish(ghost.model_copy(update={"heartbeat": time.time() - 60}))
        report = reconcile(farm.tracker, celery, requeue_after=600)
        assert sorted(report.rerouted) == sorted([high.id, low.id])
        assert {farm.get(j.id).queue for j in (high, low)} == {"render"}
        assert farm.tracker.queue_depths(["render"]) == {"render": 2}
        assert reconcile(farm.tracker, celery, requeue_after=600).rerouted == []  # once
        # Without any worker, new jobs go to the general queue.
        r.delete(keys.workers)
        assert Router(farm.tracker.workers.consumed_queues).queue_for(job(3)) == "render"


def test_farm_workers_lists_the_registry(settings, capsys, monkeypatch):
    for name, value in settings_env(settings).items():
        if name.startswith("FARM_"):
            monkeypatch.setenv(name, value)
    now = time.time()
    with Farm(settings) as farm:
        farm.tracker.workers.publish(
            WorkerInfo(
                name="cuda1@gpu7",
                host="gpu7",
                pid=7,
                device="cuda:0",
                queues=["render"],
                models=["tiny", "tiny-inpaint"],
                job="j-123",
                jobs_done=42,
                started_at=now - 100,
                heartbeat=now - 3,
            ),
        )
        farm.tracker.workers.publish(
            WorkerInfo(
                name="cpu0@box",
                host="box",
                pid=8,
                device="cpu",
                started_at=now,
                heartbeat=now - 300,
            ),
        )
        farm.submit(job(1, priority=7))  # waits in `render` (at a priority sub-list)
    assert farm_main(["workers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "DEVICE", "MODELS", "JOB", "DONE", "HEARTBEAT"]
    assert lines[1].split() == ["cpu0@box", "offline", "cpu", "-", "-", "0", "5m", "ago"]
    assert lines[2].split()[:6] == [
        "cuda1@gpu7",
        "online",
        "cuda:0",
        "tiny,tiny-inpaint",
        "j-123",
        "42",
    ]
    assert lines[2].split()[6:] in (["3s", "ago"], ["4s", "ago"])
    assert lines[3] == "waiting: finetune 0  render 1"
    assert farm_main(["workers", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(w["name"], w["online"], w["jobs_done"]) for w in listed] == [
        ("cpu0@box", False, 0),
        ("cuda1@gpu7", True, 42),
    ]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format → {'name{labels}': value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_celery_tools_get_the_farms_app(settings):
    env = settings_env(settings.model_copy(update={"key_prefix": "blue:"}))
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from farm.queue.flower import app; o = app.conf.broker_transport_options; "
            "print(app.conf.broker_url, o['global_keyprefix'], app.conf.worker_send_task_events)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [settings.redis_url, "blue:celery:", "True"]
