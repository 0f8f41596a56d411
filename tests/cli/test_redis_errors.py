"""Redis trouble as a user meets it: every `farm` command says so in one line and exits 3,
and waiting clients ride out a Redis restart instead of dying with a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis

from farm import Farm, JobCancelled, Txt2Img
from farm.errors import EXIT_UNAVAILABLE, TransientError
from farm.local.embedded import RedisServer, free_port
from farm.settings import FarmSettings, settings_env
from tests.support.cli import run_cli

DEAD = "redis://127.0.0.1:1/0"

COMMANDS = [
    ("submit", "txt2img", "--model", "tiny", "--prompt", "a fox"),
    ("status", "0123abcd"),
    ("wait", "0123abcd"),
    ("wait", "a", "b"),
    ("cancel", "0123abcd"),
    ("fetch", "0123abcd", "{tmp}/out"),
    ("workers",),
    ("workers", "--json"),
    ("batch", "submit", "{tmp}/rows.jsonl", "--name", "cats"),
    ("batch", "status", "cats"),
    ("batch", "status", "cats", "--watch"),
    ("batch", "wait", "cats"),
    ("batch", "retry", "cats"),
    ("batch", "cancel", "cats"),
    ("batch", "list"),
    ("batch", "fetch", "cats", "{tmp}/ds"),
    ("batch", "sheet", "cats", "{tmp}/sheet.png"),
]


@pytest.fixture
def dead_farm(tmp_path) -> FarmSettings:
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a fox", "model": "tiny"}\n')
    return FarmSettings(
        redis_url=DEAD, storage=(tmp_path / "store").as_uri(), home=tmp_path, reconnect_seconds=1
    )


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_every_command_says_redis_is_unavailable_in_one_line(dead_farm, tmp_path, args):
    res = run_cli(dead_farm, *(a.format(tmp=tmp_path) for a in args), timeout=60)
    assert res.returncode == EXIT_UNAVAILABLE, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "redis.exceptions" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert re.match(r"farm: (job \w+: )?Redis unavailable at 127\.0\.0\.1:1 while \w", last), last
    # Waiting commands say once that they retry, then give up with that one line.
    others = [line for line in res.stderr.strip().splitlines()[:-1]]
    assert all("retrying" in line for line in others), res.stderr


def test_a_wrong_password_is_one_line_too(redis_server, tmp_path):
    url = redis_server.url.replace("redis://", "redis://:wrong@")
    settings = FarmSettings(redis_url=url, storage=(tmp_path / "s").as_uri(), home=tmp_path)
    res = run_cli(settings, "status", "0123abcd")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "wrong" not in res.stderr, res.stderr


@pytest.fixture
def restartable(tmp_path):
    server = RedisServer(tmp_path / "redis", port=free_port(), appendfsync="always")
    with server:
        yield server


def restart_after(server: RedisServer, delay: float, down: float) -> threading.Thread:
    def go() -> None:
        time.sleep(delay)
        server.stop()
        time.sleep(down)
        server.start()

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def test_farm_wait_rides_out_a_redis_restart(restartable, tmp_path):
    settings = FarmSettings(
        redis_url=restartable.url,
        storage=(tmp_path / "store").as_uri(),
        home=tmp_path,
        key_prefix=f"r{uuid.uuid4().hex[:6]}:",
    )
    with Farm(settings) as farm:
        job = farm.submit(Txt2Img(model="tiny", prompt="a fox", seed=1))  # no worker: it waits
        waiter = subprocess.Popen(
            [sys.executable, "-m", "farm", "wait", job.id, "--timeout", "60"],
            env=settings_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        restart_after(restartable, delay=1.0, down=4.0).join()
        time.sleep(1.0)
        assert waiter.poll() is None  # still waiting, through the outage
        farm.cancel(job.id)
        out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 1 and f"{job.id}  txt2img  cancelled" in out, (out, err)
    assert "Traceback" not in err
    assert "Redis unavailable, retrying" in err  # said once, on stderr


def test_the_sdk_wait_rides_out_a_redis_restart(restartable, tmp_path):
    settings = FarmSettings(
        redis_url=restartable.url,
        storage=(tmp_path / "store").as_uri(),
        home=tmp_path,
        key_prefix=f"r{uuid.uuid4().hex[:6]}:",
    )
    with Farm(settings) as farm:
        job = farm.submit(Txt2Img(model="tiny", prompt="a fox", seed=1))
        outage = restart_after(restartable, delay=0.5, down=3.0)
        seen: list[str | None] = []

        def cancel_later() -> None:
            outage.join()
            time.sleep(0.5)
            with Farm(settings) as other:
                other.cancel(job.id)

        threading.Thread(target=cancel_later).start()
        with pytest.raises(JobCancelled):
            farm.wait([job.id], timeout=60, raise_on_failure=True, on_unavailable=seen.append)
    assert seen and seen[0] is not None and seen[-1] is None  # gone, then back


def test_wait_gives_up_in_one_line_when_redis_stays_away(restartable, tmp_path):
    settings = FarmSettings(
        redis_url=restartable.url,
        storage=(tmp_path / "store").as_uri(),
        home=tmp_path,
        reconnect_seconds=2,
    )
    with Farm(settings) as farm:
        job = farm.submit(Txt2Img(model="tiny", prompt="a fox", seed=1))
        waiter = subprocess.Popen(
            [sys.executable, "-m", "farm", "wait", job.id],
            env=settings_env(settings),
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)
        restartable.stop()
        _, err = waiter.communicate(timeout=60)
    assert waiter.returncode == EXIT_UNAVAILABLE and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("farm: Redis unavailable at "), err
    with pytest.raises(TransientError, match="Redis unavailable at 127.0.0.1"):
        Farm(settings).get(job.id)


# --------------------------------------------------------------------------- memory limits


@pytest.fixture
def evicting(tmp_path):
    with RedisServer(tmp_path / "lru", appendonly=False, maxmemory_policy="allkeys-lru") as rs:
        yield rs


@pytest.mark.parametrize("command", [("worker",), ("worker", "--workers", "2"), ("up",)])
def test_worker_and_up_refuse_a_redis_that_evicts(evicting, tmp_path, command):
    settings = FarmSettings(
        redis_url=evicting.url, storage=(tmp_path / "s").as_uri(), home=tmp_path
    )
    res = run_cli(settings, *command, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stderr)
    (line,) = res.stderr.strip().splitlines()[-1:]
    assert "Traceback" not in res.stderr
    assert (
        line.startswith("farm: error: Redis at 127.0.0.1:")
        and "maxmemory-policy allkeys-lru" in line
    )
    assert "needs noeviction" in line


def test_the_embedded_redis_never_evicts(tmp_path):
    with RedisServer(tmp_path / "r", appendonly=False) as rs:
        client = rs.client(decode_responses=True)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()


def test_a_full_redis_is_one_line_naming_its_memory_limit(tmp_path):
    with RedisServer(tmp_path / "full", appendonly=False, maxmemory="3mb") as rs:
        settings = FarmSettings(redis_url=rs.url, storage=(tmp_path / "s").as_uri(), home=tmp_path)
        filler = rs.client()
        try:  # fill it to the brim, as a backlog would
            for i in range(100_000):
                filler.set(f"filler:{i}", "x" * 1000)
        except redis.exceptions.OutOfMemoryError:
            pass
        finally:
            filler.close()
        res = run_cli(settings, "submit", "txt2img", "--model", "tiny", "--prompt", "a fox")
        assert res.returncode == EXIT_UNAVAILABLE, (res.returncode, res.stderr)
        assert "Traceback" not in res.stderr
        (line,) = res.stderr.strip().splitlines()
        assert "is at its memory limit (the server's maxmemory)" in line and "OOM" in line
        with Farm(settings) as farm, pytest.raises(TransientError, match="memory limit"):
            farm.submit(Txt2Img(model="tiny", prompt="a fox"))
