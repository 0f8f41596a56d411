"""`farm up` as a user runs it: in a terminal, stopped with Ctrl-C, started twice, killed.

Each test drives the real command in a real pseudo-terminal (`tests.support.terminal`), so a
Ctrl-C is the terminal's: the kernel signals the whole foreground process group, as a shell's
terminal does (a `kill -INT <pid>` reaches one process only, and hid the first bug below).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from farm import Farm
from farm.jobs.state import JobState
from farm.local.embedded import RedisServer
from farm.settings import FarmSettings
from farm.state.tracker import Tracker
from tests.local.test_up import processes_with_env
from tests.support.cli import run_cli
from tests.support.terminal import Terminal

ROOT = str(Path(__file__).resolve().parents[2])
STEPS = 200


def user_env(home: Path) -> dict[str, str]:
    """A shell's environment: nothing configured but FARM_HOME (and the Hub kept offline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    return env | {"FARM_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def client(home: Path) -> Farm:
    """The SDK as a user's script gets it: it finds the running farm through FARM_HOME."""
    return Farm(FarmSettings(home=home))


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, colour in enumerate(["red", "navy", "olive"]):
        Image.new("RGB", (48, 48), colour).save(folder / f"{i}.png")
    return folder


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_ctrl_c_in_the_terminal_hands_the_job_back_and_the_next_farm_up_resumes_it(
    tmp_path, photos
):
    """The issue's session: a long fine-tune in flight, Ctrl-C in `farm up`'s terminal. It
    used to kill the private redis-server too (it was in the terminal's process group), so
    the worker's hand-back failed (`Redis unavailable`, `worker entry not withdrawn`) and the
    next `farm up` found the job `running … lease expired` and a ghost worker. Now: the job
    is queued again ("worker shut down"), nothing is left in the registry, and the next
    `farm up` finishes it from the checkpoint the worker wrote as it stopped, not step 0."""
    home = tmp_path / "home"
    env = user_env(home)
    up = Terminal.farm("up", "--threads", "1", env=env, cwd=ROOT)
    try:
        up.wait_for("farm up: ready", timeout=120)
        assert f"farm up: worker cpu0@{socket.gethostname()} is ready" in up.output
        submitted = run_cli(
            FarmSettings(home=home),
            *("submit", "finetune", "--model", "tiny", "--images", photos, "--prompt", "sks"),
            *("--resolution", 32, "--steps", STEPS, "--checkpointing-steps", 10_000, "--seed", 1),
        )
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        with client(home) as farm:
            wait_until(lambda: farm.get(job_id).progress.step >= 20, 120, "training to move")
        up.ctrl_c()
        assert up.wait(90) == 0, up.output
    finally:
        up.close()
    screen = up.output
    assert "farm up: stopping" in screen and "farm up: stopped" in screen, screen
    worker_log = (home / "logs" / "worker-0.log").read_text()
    assert "Redis unavailable" not in worker_log and "not withdrawn" not in worker_log, worker_log
    assert processes_with_env(f"FARM_HOME={home}") == []  # nothing of it is left running

    # Between the two farms: Redis' own files tell what the first one left behind.
    with RedisServer(home / "redis") as redis_server:
        tracker = Tracker.from_url(redis_server.url)
        try:
            rec = tracker.get(job_id)
            assert rec.state == JobState.QUEUED, (rec.state, rec.error)  # handed back
            assert rec.error == "worker shut down" and "lease expired" not in rec.error
            assert tracker.workers.read(starting=True) == []  # no ghost worker
            at_stop = rec.progress.step
            shown = run_cli(FarmSettings(redis_url=redis_server.url, home=home), "status", job_id)
            # A past attempt's reason is not shown on a job that waits for its next attempt.
            assert shown.stdout.split()[:3] == [job_id, "finetune", "queued"], shown.stdout
            assert "error" not in shown.stdout and "shut down" not in shown.stdout
        finally:
            tracker.close()

    # The next `farm up` takes it again and finishes it from where the first stopped.
    again = Terminal.farm("up", "--threads", "1", env=env, cwd=ROOT)
    try:
        again.wait_for("farm up: ready", timeout=120)
        with client(home) as farm:
            rec = farm.wait([job_id], timeout=240)[0]
            assert rec.state == JobState.SUCCEEDED, rec.error
            loss = json.loads(farm.store.get_uri(rec.outputs[1]))
        again.ctrl_c()
        assert again.wait(90) == 0, again.output
    finally:
        again.close()
    segments = [(s["attempt"], s["from_step"]) for s in loss["segments"]]
    assert segments == [(1, 0), (2, at_stop)] and at_stop >= 20, segments
    assert len(loss["loss"]) == STEPS


def test_a_second_farm_up_on_the_same_home_is_refused_and_a_killed_one_blocks_nothing(
    tmp_path,
):
    home = tmp_path / "home"
    env = user_env(home)
    first = Terminal.farm("up", "--threads", "1", env=env, cwd=ROOT)
    try:
        first.wait_for("farm up: ready", timeout=120)
        state = (home / "up.json").read_text()
        # 1. A second one is refused at once, in one line, and the first is untouched.
        second = Terminal.farm("up", "--threads", "1", env=env, cwd=ROOT)
        assert second.wait(60) == 2, second.output
        lines = second.output.strip().splitlines()
        assert lines == [
            f"farm: error: a farm is already running here (pid {first.pid}, FARM_HOME {home}); "
            "stop it first (Ctrl-C in its terminal), or give this one another FARM_HOME"
        ], second.output
        second.close()
        assert (home / "up.json").read_text() == state
        job = run_cli(
            FarmSettings(home=home),
            *("submit", "txt2img", "--model", "tiny", "--prompt", "a fox", "--steps", 2, "--wait"),
        )
        assert job.returncode == 0, job.stderr
        # 2. Killed outright: its Redis and worker go with it; its up.json stays behind.
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
        wait_until(lambda: processes_with_env(f"FARM_HOME={home}") == [], 60, "its children")
    finally:
        first.close()
    assert json.loads((home / "up.json").read_text())["pid"] == first.pid
    gone = run_cli(FarmSettings(home=home), "status", "0123abcd")
    assert gone.returncode == 2 and "no embedded farm is running" in gone.stderr, gone.stderr
    # 3. Nothing it left blocks the next one.
    third = Terminal.farm("up", "--threads", "1", env=env, cwd=ROOT)
    try:
        third.wait_for("farm up: ready", timeout=120)
        assert json.loads((home / "up.json").read_text())["pid"] == third.pid
        third.ctrl_c()
        assert third.wait(60) == 0, third.output
    finally:
        third.close()
    assert not (home / "up.json").exists()
