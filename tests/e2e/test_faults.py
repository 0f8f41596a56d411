"""Faults the farm survives, each on real servers with real worker processes.

Every test ends with the checker: no submitted job lost, no output written twice with
different bytes, nothing written for a job nobody submitted.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid

import pytest

from farm import Farm, JobState, Txt2Img
from farm.local.embedded import RedisServer
from farm.local.up import LocalFarm
from farm.queue.app import enqueue
from farm.queue.routing import RENDER_QUEUE
from farm.settings import FarmSettings, settings_env
from farm.state.reconciler import reconcile
from farm.storage.s3 import S3Store
from tests.support.checker import check, enable_versioning
from tests.support.raw import raw
from tests.support.tcp_proxy import TcpProxy

SLOW = 300  # steps: a few seconds of rendering on one CPU thread


def make_settings(tmp, s3, redis_url, **extra):
    bucket = f"fault-{uuid.uuid4().hex[:12]}"
    store = S3Store(bucket, "farm/", endpoint_url=s3.endpoint_url, region="us-east-1")
    store.ensure_bucket()
    enable_versioning(store)
    settings = FarmSettings(
        redis_url=redis_url,
        storage=f"s3://{bucket}/farm",
        s3_endpoint_url=s3.endpoint_url,
        s3_region="us-east-1",
        home=tmp,
        key_prefix=f"f{uuid.uuid4().hex[:6]}:",
        lease_seconds=2.0,
        reconcile_interval=0.5,
        requeue_after=30,
        max_deliveries=2,
        fault_injection=True,
        **extra,
    )
    return settings, store


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis"), appendonly=True, appendfsync="always") as rs:
        yield rs


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, s3_server, redis_aof):
    """Two workers (they restart when they die), short leases, fault injection on."""
    settings, store = make_settings(tmp_path_factory.mktemp("faults"), s3_server, redis_aof.url)
    with (
        LocalFarm(settings, workers=2, threads=1, preload=["tiny"]) as lf,
        Farm(lf.settings) as farm,
    ):
        farm.submitted = {}
        farm.local = lf
        farm.store_s3 = store
        yield farm
        verdict = check(store, farm.submitted)
        assert verdict.clean, verdict


def submit(farm, **kw):
    spec = Txt2Img(
        model="tiny",
        prompt=kw.pop("prompt", "a fox"),
        seed=kw.pop("seed", 1),
        num_inference_steps=kw.pop("steps", 2),
        **kw,
    )
    job = farm.submit(spec)
    farm.submitted[job.id] = spec.num_images_per_prompt
    return job


def wait_running(job, min_step=2, timeout=60):
    deadline = time.monotonic() + timeout
    while (rec := job.status()).progress.step < min_step or rec.state != JobState.RUNNING:
        assert time.monotonic() < deadline, rec
        time.sleep(0.05)
    return rec


def worker_proc(farm, name):
    index = int(name.split("@")[0].removeprefix("cpu"))  # cpu<i>@host: farm.launcher.plan
    return farm.local.procs[index]


def test_sigkill_mid_render_another_worker_finishes(faulty):
    job = submit(faulty, steps=SLOW, seed=11)
    rec = wait_running(job)
    worker_proc(faulty, rec.worker).kill()
    done = job.wait(timeout=120)
    assert done.state == JobState.SUCCEEDED and done.attempt == 2
    assert check(faulty.store_s3, {job.id: 1}).writes[f"jobs/{job.id}/out/0.png"] == 1


def test_sigterm_mid_render_hands_the_job_back(faulty):
    job = submit(faulty, steps=SLOW, seed=12)
    rec = wait_running(job)
    worker_proc(faulty, rec.worker).send_signal(signal.SIGTERM)
    done = job.wait(timeout=120)
    assert done.state == JobState.SUCCEEDED and done.attempt == 2
    assert done.progress.step == SLOW
    assert check(faulty.store_s3, {job.id: 1}).writes[f"jobs/{job.id}/out/0.png"] == 1


def test_poison_job_is_dead_lettered_and_the_queue_drains(faulty):
    poison = submit(faulty, prompt="[fault:kill] boom", steps=3)
    others = [submit(faulty, seed=20 + i) for i in range(3)]
    rec = faulty.wait([poison.id], timeout=180)[0]
    assert rec.state == JobState.FAILED and "dead-lettered after 2 attempts" in rec.error
    faulty.submitted.pop(poison.id)  # failed on purpose: no outputs expected
    assert all(
        r.state == JobState.SUCCEEDED for r in faulty.wait([o.id for o in others], timeout=120)
    )


def test_same_job_delivered_many_times_at_once_runs_once(faulty):
    job = submit(faulty, steps=20, seed=13)
    enqueue(faulty.celery, [(job.id, RENDER_QUEUE, 0)] * 3)
    rec = job.wait(timeout=120)
    submit(faulty, seed=14).wait(timeout=120)  # both workers have drained the duplicates
    assert faulty.get(job.id).attempt == rec.attempt == 1
    assert check(faulty.store_s3, {job.id: 1}).writes[f"jobs/{job.id}/out/0.png"] == 1


def test_redelivery_during_a_long_render_does_not_run_it_twice(faulty):
    # What Redis does once the visibility timeout passes: the job's message comes again, to
    # the other (idle) worker, while the first still renders. The live lease wins.
    job = submit(faulty, steps=SLOW, seed=15)
    wait_running(job)
    enqueue(faulty.celery, [(job.id, RENDER_QUEUE, 0)])
    submit(faulty, seed=16).wait(timeout=120)  # the idle worker took the redelivery first
    assert job.status().state == JobState.RUNNING and job.status().attempt == 1
    rec = job.wait(timeout=120)
    assert rec.attempt == 1
    assert check(faulty.store_s3, {job.id: 1}).writes[f"jobs/{job.id}/out/0.png"] == 1


def test_out_of_memory_halves_the_batch_then_fails_the_culprit(faulty):
    # Both workers busy (one for longer), so the four jobs queue up together and the first
    # worker to come free gathers all of them into one batch.
    blockers = [submit(faulty, steps=SLOW, seed=30), submit(faulty, steps=SLOW + 150, seed=31)]
    for b in blockers:
        wait_running(b, min_step=1)
    specs = [
        Txt2Img(
            model="tiny",
            prompt="[fault:oom] x" if i == 0 else "x",
            seed=40 + i,
            num_inference_steps=4,
        )
        for i in range(4)
    ]
    jobs = faulty.submit_many(specs)
    faulty.submitted.update({j.id: 1 for j in jobs[1:]})
    records = faulty.wait([j.id for j in blockers + jobs], timeout=180)
    culprit, *rest = records[2:]
    assert culprit.state == JobState.FAILED and "out of device memory" in culprit.error
    assert all(r.state == JobState.SUCCEEDED for r in rest)
    logs = "".join(p.read_text() for p in faulty.local.log_dir.glob("*.log"))
    assert "batch of 4 ran out of memory; retrying halves" in logs


def test_time_limit_fails_the_job_and_the_worker_goes_on(tmp_path, s3_server, redis_aof):
    settings, store = make_settings(tmp_path, s3_server, redis_aof.url, time_limit=1.0)
    with (
        LocalFarm(settings, workers=1, threads=1, preload=["tiny"], restart=False) as lf,
        Farm(lf.settings) as farm,
    ):
        slow = farm.submit(Txt2Img(model="tiny", prompt="x", num_inference_steps=SLOW))
        rec = farm.wait([slow.id], timeout=120)[0]
        assert rec.state == JobState.FAILED and "time limit exceeded: 1 s" in rec.error
        quick = farm.submit(Txt2Img(model="tiny", prompt="x", num_inference_steps=2))
        assert quick.wait(timeout=60).state == JobState.SUCCEEDED
        assert lf.procs[0].poll() is None
        assert check(store, {quick.id: 1}).clean


def test_worker_refuses_a_time_limit_beyond_the_visibility_timeout(tmp_path, redis_aof):
    settings = FarmSettings(
        redis_url=redis_aof.url,
        storage=(tmp_path / "s").as_uri(),
        home=tmp_path,
        time_limit=100,
        visibility_timeout=50,
    )
    res = subprocess.run(
        [sys.executable, "-m", "farm", "worker"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert (
        "FARM_TIME_LIMIT (100 s) must be shorter than FARM_VISIBILITY_TIMEOUT (50 s)" in res.stderr
    )


def test_reconciler_hands_back_expired_leases_and_resends_lost_messages(tmp_path, redis_aof):
    settings = FarmSettings(
        redis_url=redis_aof.url,
        storage=(tmp_path / "s").as_uri(),
        home=tmp_path,
        key_prefix=f"rc{uuid.uuid4().hex[:6]}:",
    )
    with Farm(settings) as farm:  # no worker on this prefix
        stuck, lost = (farm.submit(Txt2Img(model="tiny", prompt="x")) for _ in range(2))
        queue = f"{settings.key_prefix}celery:{RENDER_QUEUE}"
        raw(farm).delete(*raw(farm).keys(f"{queue}*"))  # both messages lost
        assert farm.tracker.claim(stuck.id, "ghost", lease=0.1).ok
        time.sleep(0.2)
        report = reconcile(farm.tracker, farm.celery, requeue_after=3600)
        assert report.handed_back == [stuck.id] and report.requeued == []
        assert stuck.status().state == JobState.QUEUED
        # Both are overdue, but only `lost` has no message: the hand-back sent `stuck` one.
        report = reconcile(farm.tracker, farm.celery, requeue_after=0, now=time.time() + 1)
        assert report.requeued == [lost.id] and report.audited == 1
        waiting = sum(raw(farm).llen(k) for k in raw(farm).keys(f"{queue}*"))
        assert waiting == 2  # one for the hand-back, one for the re-send
        report = reconcile(farm.tracker, farm.celery, requeue_after=0, now=time.time() + 2)
        assert report.requeued == [] and report.audited == 2  # sent once


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-persistence"])
def test_redis_restart_loses_nothing_with_aof(tmp_path, s3_server, appendonly):
    with RedisServer(tmp_path / "redis", appendonly=appendonly, appendfsync="always") as rs:
        settings, store = make_settings(tmp_path, s3_server, rs.url)
        with Farm(settings) as farm:
            jobs = [
                farm.submit(Txt2Img(model="tiny", prompt="x", seed=i, num_inference_steps=2))
                for i in range(6)
            ]
        rs.kill()
        rs.restart()
        with (
            LocalFarm(settings, workers=1, threads=1, preload=["tiny"]) as lf,
            Farm(lf.settings) as farm,
        ):
            if not appendonly:  # the negative control: the records and messages are gone
                assert farm.tracker.get_many([j.id for j in jobs]) == [None] * len(jobs)
                assert check(store, {j.id: 1 for j in jobs}).lost
                return
            # Kill Redis again while the worker is connected: it and the client reconnect.
            rs.kill()
            rs.restart()
            records = farm.wait([j.id for j in jobs], timeout=180)
            assert all(r.state == JobState.SUCCEEDED for r in records)
            assert check(store, {j.id: 1 for j in jobs}).clean


@pytest.fixture
def s3_behind_proxy(tmp_path, s3_server, redis_aof):
    """A one-worker farm whose worker reaches S3 only through a proxy the test controls."""
    proxy = TcpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1])).up()
    settings, store = make_settings(tmp_path, s3_server, redis_aof.url, s3_max_attempts=3)
    worker_settings = settings.model_copy(update={"s3_endpoint_url": proxy.url})
    with (
        LocalFarm(worker_settings, workers=1, threads=1, preload=["tiny"], restart=False),
        Farm(settings) as farm,
    ):
        yield farm, proxy, store
    proxy.down()


def test_storage_down_for_seconds_the_job_still_completes(s3_behind_proxy):
    farm, proxy, store = s3_behind_proxy
    job = farm.submit(Txt2Img(model="tiny", prompt="x", seed=5, num_inference_steps=150))
    wait_running(job, min_step=1)
    proxy.down()  # the worker's output upload meets a dead server
    time.sleep(3)
    assert job.status().state != JobState.SUCCEEDED  # its upload is waiting on storage
    proxy.up()
    rec = job.wait(timeout=120)
    assert rec.state == JobState.SUCCEEDED
    assert check(store, {job.id: 1}).clean


def test_storage_down_for_long_fails_the_job_with_the_reason(s3_behind_proxy):
    farm, proxy, store = s3_behind_proxy
    job = farm.submit(Txt2Img(model="tiny", prompt="x", seed=6, num_inference_steps=150))
    wait_running(job, min_step=1)
    proxy.down()
    rec = farm.wait([job.id], timeout=180)[0]
    proxy.up()
    assert rec.state == JobState.FAILED
    assert "gave up after 2 attempts" in rec.error and "storage" in rec.error.lower()
    assert rec.outputs == [] and rec.meta is None  # never succeeded without its objects


@pytest.fixture(scope="module")
def limited(tmp_path_factory, s3_server, redis_aof):
    """One worker, a time limit of 3 s, fault injection on."""
    tmp = tmp_path_factory.mktemp("limited")
    settings, store = make_settings(tmp, s3_server, redis_aof.url, time_limit=3.0)
    with LocalFarm(settings, workers=1, threads=1, preload=["tiny"], restart=False) as lf:
        yield lf, store


def test_jobs_that_fit_the_time_limit_alone_are_split_when_together_they_do_not(limited):
    lf, store = limited
    with Farm(lf.settings) as farm:
        # Behind a busy worker the four queue up, and the worker gathers them into one call:
        # each step costs 0.25 s per job, so 4 steps take 1 s alone and 4 s together.
        # (The blocker, 8 steps of 0.2 s, keeps well inside the 3 s limit on a loaded machine.)
        blocker = farm.submit(
            Txt2Img(model="tiny", prompt="[fault:slow-steps=0.2] x", seed=50, num_inference_steps=8)
        )
        wait_running(blocker, min_step=1)
        specs = [
            Txt2Img(
                model="tiny", prompt="[fault:slow-steps=0.25] x", seed=51 + i, num_inference_steps=4
            )
            for i in range(4)
        ]
        jobs = farm.submit_many(specs)
        records = farm.wait([blocker.id, *(j.id for j in jobs)], timeout=180)
        assert [r.state for r in records] == [JobState.SUCCEEDED] * 5, [r.error for r in records]
        assert check(store, {r.id: 1 for r in records}).clean
    logs = "".join(p.read_text() for p in lf.log_dir.glob("*.log"))
    assert "micro-batch of 4 ran past its time limit; retrying halves" in logs


def test_a_worker_refuses_a_job_over_budget_that_an_older_client_let_through(limited):
    lf, store = limited
    older = lf.settings.model_copy(update={"max_prompt_chars": 100_000, "max_pixels": 8192**2})
    with Farm(older) as farm:
        long = farm.submit(Txt2Img(model="tiny", prompt="a fox " * 2000, num_inference_steps=2))
        big = farm.submit(
            Txt2Img(model="tiny", prompt="x", height=4096, width=2048, num_inference_steps=2)
        )
        first, second = farm.wait([long.id, big.id], timeout=120)
    assert first.state == JobState.FAILED and first.error == (
        "prompt: is 12000 characters, over FARM_MAX_PROMPT_CHARS (4000)"
    )
    assert second.state == JobState.FAILED and "over FARM_MAX_PIXELS (4194304)" in second.error
    assert first.attempt == second.attempt == 1  # refused for good, never retried
