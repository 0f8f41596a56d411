"""`farm dashboard` finds a farm that `farm up` restarted on a new Redis port (it re-reads
`up.json` when Redis is unreachable), instead of answering "farm unavailable" for good."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def start_up(env: dict[str, str], home) -> subprocess.Popen:
    up = subprocess.Popen(
        [sys.executable, "-m", "farm", "up", "--workers", "1", "--threads", "1", "--no-api"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (home / "up.json").exists():
        assert up.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    return up


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(60)


def test_the_dashboard_follows_farm_up_to_its_new_port(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env |= {"FARM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    up = start_up(env, home)
    first = json.loads((home / "up.json").read_text())["redis_url"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dash = subprocess.Popen(
        [sys.executable, "-m", "farm", "dashboard", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/api/overview"
    try:
        assert dash.stdout.readline().startswith("farm dashboard: http")
        assert httpx.get(url, timeout=20).status_code == 200
        stop(up)
        assert httpx.get(url, timeout=20).status_code == 503  # no farm at all: says so
        up = start_up(env, home)
        assert json.loads((home / "up.json").read_text())["redis_url"] != first
        deadline, status = time.monotonic() + 30, None
        while time.monotonic() < deadline and status != 200:
            status = httpx.get(url, timeout=20).status_code
            time.sleep(0.2)
        assert status == 200
    finally:
        dash.terminate()
        dash.wait(10)
        stop(up)
