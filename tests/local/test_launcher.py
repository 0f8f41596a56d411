"""`farm worker --gpus / --workers`: one child per device, named after it, restarted when it
dies, stopped (and unregistered) with its parent."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from farm.cli.main import main as farm_main
from farm.errors import InvalidJob
from farm.local.launcher import parse_gpus, plan
from farm.settings import FarmSettings, settings_env
from farm.state.tracker import Tracker


def test_plan_pins_one_child_per_gpu():
    children = plan(gpus=[0, 3], preload=["tiny"], metrics_port=9400, host="node7")
    assert [c.name for c in children] == ["cuda0@node7", "cuda3@node7"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in children] == ["0", "3"]
    assert [c.env["FARM_METRICS_PORT"] for c in children] == ["9400", "9401"]
    for c in children:  # each sees one GPU, so it renders on cuda:0
        assert c.command[c.command.index("--device") + 1] == "cuda:0"
        assert c.command[c.command.index("--preload") + 1] == "tiny"


def test_plan_cpu_workers_get_one_thread_each():
    children = plan(workers=3, host="box")
    assert [c.name for c in children] == ["cpu0@box", "cpu1@box", "cpu2@box"]
    assert all(c.command[c.command.index("--threads") + 1] == "1" for c in children)
    assert all("CUDA_VISIBLE_DEVICES" not in c.env and not c.env for c in children)


@pytest.mark.parametrize("spec", ["", "0,,1", "gpu0", "1,1", "-1"])
def test_bad_gpu_lists_are_refused(spec):
    with pytest.raises(InvalidJob, match="gpus"):
        parse_gpus(spec)


def test_gpus_all_without_a_gpu_is_a_clear_error(capsys, monkeypatch):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    assert parse_gpus("0,1,3") == [0, 1, 3]  # explicit indices are believed; the child checks
    assert farm_main(["worker", "--gpus", "all"]) == 2
    assert "gpus: 'all' found no GPU" in capsys.readouterr().err


def test_worker_many_starts_restarts_and_stops_its_children(redis_url, tmp_path):
    settings = FarmSettings(
        redis_url=redis_url, storage=(tmp_path / "s").as_uri(), home=tmp_path / "h"
    )
    tracker = Tracker.from_settings(settings)
    host = socket.gethostname()
    parent = subprocess.Popen(
        [sys.executable, "-m", "farm", "worker", "--workers", "2"],
        env=settings_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def workers():
            return {w.name: w for w in tracker.workers.read() if w.online()}

        deadline = time.monotonic() + 90
        while set(workers()) != {f"cpu0@{host}", f"cpu1@{host}"}:
            assert parent.poll() is None and time.monotonic() < deadline, workers()
            time.sleep(0.2)
        first = workers()[f"cpu1@{host}"]
        assert first.device == "cpu" and first.queues == ["render"]
        # A child killed (out of memory, a segfault) comes back under the same name.
        os.kill(first.pid, signal.SIGKILL)
        while (w := workers().get(f"cpu1@{host}")) is None or w.pid == first.pid:
            assert time.monotonic() < deadline + 60, "cpu1 was not restarted"
            time.sleep(0.2)
        pids = [w.pid for w in workers().values()]
        # SIGTERM to the parent stops every child, and each removes its entry.
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(60) == 0
        assert tracker.workers.read() == []
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_pinned_child_reports_the_gpu_the_machine_knows(monkeypatch):
    import torch

    from workers.presence import physical_device

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # torch calls it cuda:0
    assert physical_device(torch.device("cuda", 0)) == "cuda:3"
    assert physical_device(torch.device("cpu")) == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5f1c")  # a UUID: torch's name stays
    assert physical_device(torch.device("cuda", 0)) == "cuda:0"
