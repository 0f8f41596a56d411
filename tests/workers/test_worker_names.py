"""Two `farm worker --device cpu` on one host, as a user starts them in two terminals: both are
`cpu@host` by default, and used to overwrite each other's registry entry (`farm workers`
listed one). A name belongs to one live worker: the second serves as `cpu-2@host`."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

from farm import Farm, Txt2Img
from farm.settings import FarmSettings, settings_env
from farm.state.tracker import Tracker
from tests.support.cli import run_cli


def start_worker(settings: FarmSettings, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "farm", "worker", "--device", "cpu", "--threads", "1"],
        env=settings_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_two_cpu_workers_on_one_host_get_distinct_names_and_are_both_listed(redis_url, tmp_path):
    settings = FarmSettings(
        redis_url=redis_url, storage=(tmp_path / "store").as_uri(), home=tmp_path / "home"
    )
    host = socket.gethostname()
    tracker = Tracker.from_settings(settings)
    logs = [open(tmp_path / f"w{i}.log", "wb") for i in range(2)]  # noqa: SIM115
    first = start_worker(settings, logs[0])
    procs = [first]
    try:
        deadline = time.monotonic() + 120
        while not any(w.name == f"cpu@{host}" for w in tracker.workers.read()):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        procs.append(start_worker(settings, logs[1]))
        while len(tracker.workers.read()) < 2:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.2)
        entries = {w.name: w for w in tracker.workers.read()}
        assert set(entries) == {f"cpu@{host}", f"cpu-2@{host}"}
        assert [entries[f"cpu@{host}"].pid, entries[f"cpu-2@{host}"].pid] == [p.pid for p in procs]
        listed = run_cli(settings, "workers")
        assert listed.returncode == 0
        names = [line.split()[0] for line in listed.stdout.splitlines()[1:-1]]
        assert names == [f"cpu-2@{host}", f"cpu@{host}"], listed.stdout
        assert all(line.split()[1] == "online" for line in listed.stdout.splitlines()[1:-1])
        # Each keeps its own entry: jobs done by one never show up on the other's.
        with Farm(settings) as farm:
            jobs = farm.submit_many(
                Txt2Img(model="tiny", prompt="a fox", seed=i, num_inference_steps=2)
                for i in range(4)
            )
            records = farm.wait([j.id for j in jobs], timeout=180)
        assert all(r.state.value == "succeeded" for r in records)
        time.sleep(2.5)  # a presence beat
        done = {w.name: w.jobs_done for w in tracker.workers.read()}
        by_worker = {name: sum(r.worker == name for r in records) for name in done}
        assert done == by_worker, (done, by_worker)
        # A worker's log says which name it serves under, and why.
        for p in procs:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(60) for p in procs] == [0, 0]
        assert tracker.workers.read(starting=True) == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
        tracker.close()
    second_log = (tmp_path / "w1.log").read_text()
    assert f"worker name cpu@{host} is held by a live worker; this one serves as cpu-2@{host}" in (
        second_log
    )
