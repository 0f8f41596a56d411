"""`farm up` and `farm demo`: embedded farms that start all they need and stop all they started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from farm.cli.demo import run_demo


def test_farm_up_serves_cli_and_stops_everything(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env |= {"FARM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    up = subprocess.Popen(
        [sys.executable, "-m", "farm", "up", "--workers", "1", "--threads", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state_file = tmp_path / "home" / "up.json"
    try:
        deadline = time.monotonic() + 60
        while not state_file.exists():
            assert up.poll() is None and time.monotonic() < deadline, up.stdout.read()
            time.sleep(0.1)
        state = json.loads(state_file.read_text())
        assert state["redis_url"].startswith("redis://127.0.0.1:")
        # The API beside it: its URL and a local admin token, printed.
        lines = [up.stdout.readline() for _ in range(6)]
        api_url = next(ln.split()[3] for ln in lines if ln.startswith("farm up: api "))
        token = next(ln.split()[-1] for ln in lines if ln.startswith("farm up: local admin token"))
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.get(api_url + "readyz").json() == {"ok": True}
        assert httpx.get(api_url + "v1/workers", headers=auth).status_code == 200
        assert httpx.get(api_url + "v1/workers").status_code == 401
        # Nothing configured in the client: it finds the running farm through FARM_HOME.
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "farm",
                "submit",
                "txt2img",
                "--model",
                "tiny",
                "--prompt",
                "a fox",
                "--steps",
                "2",
                "--wait",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["state"] == "succeeded"
        assert len(processes_with_env(f"FARM_HOME={tmp_path / 'home'}")) >= 2  # up, its worker
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert not state_file.exists()
    left = processes_with_env(f"FARM_HOME={tmp_path / 'home'}")
    assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes() for p in left]  # workers gone
    with pytest.raises(redis.ConnectionError):  # and so is its Redis
        redis.Redis.from_url(state["redis_url"], socket_connect_timeout=1).ping()


def processes_with_env(entry: str) -> list[int]:
    """Live processes whose environment holds `entry` (the children `farm up` started)."""
    found = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                with open(f"/proc/{proc}/environ", "rb") as f:
                    if entry.encode() in f.read().split(b"\0"):
                        found.append(int(proc))
            except OSError:
                continue
    return found


def test_demo_writes_contact_sheet(tmp_path, capsys):
    assert run_demo(tmp_path / "demo", workers=1, n_images=2, variations=1) == 0
    sheet = Image.open(tmp_path / "demo" / "contact-sheet.png")
    assert sheet.width > sheet.height > 0  # 2 rows: input | mask | output
    assert len(list((tmp_path / "demo" / "jobs").glob("*/0.png"))) == 2
    # Label-preserving inpainting: only the masked boxes were repainted, and the sheet is
    # labelled (a header over source | mask | variation 1, a caption under each row).
    out = capsys.readouterr().out
    assert "demo: preserve_unmasked: every pixel outside the masks is the source's" in out, out
    from farm.inputs.images import label_height

    line = label_height()
    assert sheet.size == (3 * 128 + 4 * 4, line + 4 + 2 * (128 + line) + 3 * 4)
    header = sheet.convert("L").crop((4, 4, sheet.width - 4, 4 + line))
    assert min(header.getdata()) < 128
