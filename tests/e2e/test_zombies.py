"""A zombie never overwrites a finished job.

A worker paused after rendering (SIGSTOP here; in life a GC pause, a VM stall, a partition
holding its PUTs) wakes after its lease ran out and another worker took the job over and
finished it. Whatever it does then, what the current attempt stored stays: every key holds one
version, the bytes the finished attempt's record and meta.json describe.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path

from farm import Farm, JobState, Txt2Img
from farm.local.launcher import Child, Supervisor, worker_command
from farm.settings import FarmSettings, settings_env
from farm.storage import open_store
from tests.e2e.test_faults import make_settings, redis_aof  # noqa: F401 (a fixture)
from tests.support.checker import check
from tests.support.tcp_proxy import TcpProxy


def worker(name: str, settings: FarmSettings, tmp: Path) -> Supervisor:
    """One named worker process (no restarts) on these settings."""
    child = Child(
        name, worker_command("cpu", 1, name=name, preload=["tiny"]), {}, tmp / f"{name}.log"
    )
    sup = Supervisor([child], settings_env(settings), restart=False)
    sup.start()
    return sup


def until(what: str, predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stopped(pid: int) -> bool:
    """The process is stopped by a signal (state T in /proc)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")


def superseded(log: Path) -> bool:
    return log.exists() and "superseded; its succeeded is not recorded" in log.read_text()


def stored(store, job_id: str) -> dict[str, bytes]:
    return {key: store.get(key) for key in store.list(f"jobs/{job_id}/")}


def test_a_zombie_whose_puts_were_held_never_replaces_the_finished_jobs_objects(
    tmp_path,
    s3_server,
    redis_aof,  # noqa: F811
):
    settings, store = make_settings(tmp_path, s3_server, redis_aof.url)
    proxy = TcpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1])).up()
    zombie_settings = settings.model_copy(update={"s3_endpoint_url": proxy.url})
    zombie = worker("zombie@test", zombie_settings, tmp_path)
    other = None
    try:
        with Farm(settings) as farm:
            job = farm.submit(Txt2Img(model="tiny", prompt="x", seed=21, num_inference_steps=150))
            until("the zombie to render", lambda: job.status().progress.step >= 1)
            assert job.status().worker == "zombie@test"
            # Its PUTs leave it, and are held on the way: then it stops, its lease runs out.
            proxy.hold()
            until("the zombie's PUTs", lambda: proxy.held_bytes > 0)
            zombie.procs[0].send_signal(signal.SIGSTOP)
            other = worker("other@test", settings, tmp_path)
            done = job.wait(timeout=120)
            assert (done.state, done.attempt, done.worker) == (JobState.SUCCEEDED, 2, "other@test")
            before = stored(store, job.id)
            # It wakes, and its held PUTs land after the winner's.
            zombie.procs[0].send_signal(signal.SIGCONT)
            proxy.release()
            until("the zombie to learn", lambda: superseded(tmp_path / "zombie@test.log"))
            assert farm.get(job.id).attempt == 2
        verdict = check(store, {job.id: 1})
        assert verdict.clean, verdict
        assert set(verdict.writes.values()) == {1}, verdict.writes  # every key written once
        assert stored(store, job.id) == before
        assert json.loads(before[f"jobs/{job.id}/meta.json"])["attempt"] == 2
    finally:
        proxy.release()
        for sup in (zombie, other):
            if sup is not None:
                for proc in sup.procs:
                    proc.send_signal(signal.SIGCONT)
                sup.stop()
        proxy.down()


def test_a_zombie_on_a_folder_store_never_replaces_the_finished_jobs_files(
    tmp_path,
    redis_aof,  # noqa: F811
):
    settings = FarmSettings(
        redis_url=redis_aof.url,
        storage=(tmp_path / "store").as_uri(),
        home=tmp_path,
        key_prefix=f"z{uuid.uuid4().hex[:6]}:",
        lease_seconds=2.0,
        reconcile_interval=0.5,
        fault_injection=True,
    )
    store = open_store(settings)
    zombie = worker("zombie@test", settings, tmp_path)
    other = None
    try:
        with Farm(settings) as farm:
            # Its first attempt stops itself after rendering, past every check, before storing.
            spec = Txt2Img(model="tiny", prompt="[fault:pause-before-store] x", seed=22)
            job = farm.submit(spec.model_copy(update={"num_inference_steps": 10}))
            until("the zombie to stop", lambda: stopped(zombie.procs[0].pid))
            assert stored(store, job.id) == {}
            other = worker("other@test", settings, tmp_path)
            done = job.wait(timeout=120)
            assert (done.state, done.attempt, done.worker) == (JobState.SUCCEEDED, 2, "other@test")
            before = stored(store, job.id)
            inodes = {p: p.stat().st_ino for p in (tmp_path / "store" / "jobs").rglob("*.*")}
            zombie.procs[0].send_signal(signal.SIGCONT)
            until("the zombie to learn", lambda: superseded(tmp_path / "zombie@test.log"))
            assert farm.get(job.id).attempt == 2
        assert stored(store, job.id) == before
        assert {p: p.stat().st_ino for p in inodes} == inodes  # not even rewritten alike
        assert json.loads(before[f"jobs/{job.id}/meta.json"])["attempt"] == 2
        assert list((tmp_path / "store" / ".farm-tmp").iterdir()) == []  # its bytes dropped
    finally:
        for sup in (zombie, other):
            if sup is not None:
                for proc in sup.procs:
                    proc.send_signal(signal.SIGCONT)
                sup.stop()
