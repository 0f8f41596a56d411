"""Failures you can see, as a user meets them on the command line with a real worker: `farm
batch wait` says why it exits 1, `farm batch status` lists the failed slots and their reasons,
`farm batch retry` skips what must fail again, `farm jobs` lists jobs with their errors, and
`farm submit --wait` never loses the job's id.

The failing row names a model this machine cannot check (`FARM_MODEL_CHECK=0`, as on a
submit-only box) and the worker cannot find: it fails as invalid input (`InvalidJob`)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import pytest
from PIL import Image

from farm.local.up import LocalFarm
from farm.settings import FarmSettings, settings_env
from tests.support.cli import run_cli

MISSING = "nobody/missing"


@pytest.fixture(scope="module")
def farm(redis_server, tmp_path_factory):
    """A worker, and batch `cats`: two rows that render, one whose model no worker has."""
    tmp = tmp_path_factory.mktemp("failures")
    settings = FarmSettings(
        redis_url=redis_server.url,
        storage=(tmp / "store").as_uri(),
        home=tmp / "home",
        key_prefix=f"f{uuid.uuid4().hex[:8]}:",
        model_check=False,
    )
    Image.new("RGB", (64, 64), "teal").save(tmp / "in.png")
    rows = [
        {"image": "in.png", "mask": "box", "prompt": "a cat", "label": "tabby"},
        {"image": "in.png", "mask": "box", "prompt": "a cat", "model": MISSING},
        {"image": "in.png", "mask": "strokes", "prompt": "a cat"},
    ]
    defaults = {"model": "tiny-inpaint", "steps": 2}
    lines = [json.dumps({"defaults": defaults})] + [json.dumps(r) for r in rows]
    (tmp / "cats.jsonl").write_text("\n".join(lines) + "\n")
    with LocalFarm(settings, workers=1, threads=1, preload=["tiny-inpaint"]) as lf:
        submitted = run_cli(settings, "batch", "submit", tmp / "cats.jsonl", "--name", "cats")
        assert submitted.returncode == 0, submitted.stderr
        waited = run_cli(settings, "batch", "wait", "cats", "--timeout", 180, timeout=240)
        yield {"settings": settings, "wait": waited, "tmp": tmp, "lf": lf}


def test_batch_wait_says_why_it_exits_1(farm):
    res = farm["wait"]
    assert res.returncode == 1
    assert (
        res.stdout.strip().splitlines()[-1].startswith("[####################----------] 3/3 jobs")
    )
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("farm: batch cats: 1 job failed of 3; top reason (1x): ")
    assert MISSING in line
    assert line.endswith("; `farm batch status cats --failed` lists them")


def test_batch_status_lists_the_failed_slots_and_their_reasons(farm):
    settings = farm["settings"]
    res = run_cli(settings, "batch", "status", "cats")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[2] == "1 failed job; top reasons:"
    assert lines[3].split(maxsplit=1) == ["1", lines[3].split(maxsplit=1)[1]]
    assert MISSING in lines[3]
    job_id, where = lines[4].split(maxsplit=1)
    assert where.startswith("row 3 variation 0 [invalid]: ") and MISSING in where, lines[4]
    as_json = json.loads(run_cli(settings, "batch", "status", "cats", "--json").stdout)
    [failure] = as_json["failures"]
    assert (failure["job"], failure["row"], failure["failure"]) == (job_id, 3, "invalid")
    assert list(as_json["reasons"].values()) == [1]
    # The worker's reason names the farm's own command to fetch the model.
    assert f"fetch it first with `farm models pull {MISSING}`" in failure["error"]


def test_farm_jobs_lists_jobs_newest_first_with_the_error(farm):
    settings = farm["settings"]
    failed = run_cli(settings, "jobs", "--state", "failed")
    assert failed.returncode == 0, failed.stderr
    head, row = failed.stdout.splitlines()
    assert head.split() == ["ID", "KIND", "MODEL", "STATE", "AGE", "ERROR"]
    fields = row.split(maxsplit=5)
    assert fields[1:4] == ["inpaint", MISSING, "failed"] and MISSING in fields[5]
    listed = json.loads(run_cli(settings, "jobs", "--json").stdout)
    assert len(listed) >= 3
    created = [r["created_at"] for r in listed]
    assert created == sorted(created, reverse=True)
    assert len(run_cli(settings, "jobs", "--limit", 1).stdout.splitlines()) == 2
    in_batch = json.loads(run_cli(settings, "jobs", "--batch", "cats", "--json").stdout)
    assert sorted(r["state"] for r in in_batch) == ["failed", "succeeded", "succeeded"]


def test_batch_retry_skips_what_must_fail_again_unless_forced(farm):
    settings = farm["settings"]
    skipped = run_cli(settings, "batch", "retry", "cats")
    assert skipped.returncode == 0
    assert skipped.stdout.strip() == "batch cats: 0 jobs re-queued as new attempts"
    [line] = skipped.stderr.strip().splitlines()
    assert line.startswith("farm: batch cats: 1 failed job not retried: it cannot succeed as ")
    assert line.endswith("; --force retries them anyway")
    forced = run_cli(settings, "batch", "retry", "cats", "--force")
    assert forced.stdout.strip() == "batch cats: 1 job re-queued as new attempts", forced.stderr
    again = run_cli(settings, "batch", "wait", "cats", "--timeout", 120, timeout=180)
    assert again.returncode == 1 and "1 job failed of 3" in again.stderr  # as it must


def test_submit_wait_prints_the_id_first_and_ctrl_c_never_loses_it(farm):
    settings = farm["settings"]
    quick = run_cli(
        settings, "submit", "txt2img", "--model", "tiny", "--prompt", "x", "--steps", 2, "--wait"
    )
    assert quick.returncode == 0, quick.stderr
    job_id = quick.stdout.split()[0]
    assert quick.stderr.splitlines()[0] == (
        f"farm: submitted job {job_id}; waiting (Ctrl-C stops waiting, not the job)"
    )
    done = run_cli(settings, "cancel", job_id)
    assert done.returncode == 1
    assert done.stderr.strip() == f"farm: job {job_id}: already succeeded; nothing to cancel"

    slow = subprocess.Popen(
        [sys.executable, "-m", "farm", "submit", "txt2img", "--model", "tiny", "--prompt", "x"]
        + ["--steps", "400", "--wait"],
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = slow.stderr.readline()
    assert first.startswith("farm: submitted job "), first
    long_id = first.split()[3].rstrip(";")
    slow.send_signal(signal.SIGINT)
    _, err = slow.communicate(timeout=60)
    assert slow.returncode == 130
    assert f"farm: stopped waiting; job {long_id} goes on (`farm wait {long_id}`)" in err
    cancelled = run_cli(settings, "cancel", long_id)
    assert cancelled.returncode == 0 and cancelled.stdout.split()[0] == f"{long_id}:"
    deadline = time.monotonic() + 60
    while (status := run_cli(settings, "status", long_id)).stdout.split()[2] != "cancelled":
        assert time.monotonic() < deadline, status.stdout
        time.sleep(0.5)
    again = run_cli(settings, "cancel", long_id)
    assert again.returncode == 1 and "already cancelled; nothing to cancel" in again.stderr


def test_a_cancelled_batch_shows_no_full_bar_and_counts_read_right(farm):
    settings, tmp = farm["settings"], farm["tmp"]
    (tmp / "one.jsonl").write_text(
        json.dumps({"prompt": "x", "model": "tiny", "steps": 300}) + "\n"
    )
    submitted = run_cli(settings, "batch", "submit", tmp / "one.jsonl", "--name", "one")
    assert "batch one: 1 job (1 row x 1 variation)" in submitted.stdout, submitted.stdout
    cancelled = run_cli(settings, "batch", "cancel", "one")
    assert cancelled.stdout.strip() == "batch one: 1 job cancelled or cancelling"
    run_cli(settings, "batch", "wait", "one", "--timeout", 60)
    status = run_cli(settings, "batch", "status", "one")
    assert status.stdout.splitlines()[1] == f"[{'-' * 30}] 1/1 job  cancelled 1", status.stdout
