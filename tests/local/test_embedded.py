"""Private servers: a real redis-server and moto's S3, started, stopped, killed and restarted."""

from __future__ import annotations

import http.client
import os
import socket
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from farm.local.embedded import RedisServer, ServerError, find_redis_server, free_port
from tests.support.s3_server import S3Server

NO_RETRY = Retry(NoBackoff(), 0)  # redis-py's own retries would slow every failing call


def answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1, retry=NO_RETRY)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def test_find_redis_server_finds_an_executable() -> None:
    exe = find_redis_server()
    assert os.access(exe, os.X_OK)


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_start_and_stop(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        assert server.running
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert answers(server.url)
        assert server.client().config_get("appendonly") == {"appendonly": "yes"}
        assert server.client().config_get("bind") == {"bind": "127.0.0.1"}
        pid = server.pid
    assert not server.running
    assert not answers(server.url)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    assert (tmp_path / "redis.conf").stat().st_mode & 0o077 == 0


def test_password_is_required_and_in_the_url(tmp_path: Path) -> None:
    with RedisServer(tmp_path, password="s3cret/pw") as server:
        assert server.url == f"redis://:s3cret%2Fpw@127.0.0.1:{server.port}/0"
        assert server.client().ping()
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, retry=NO_RETRY)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()


def test_a_key_survives_kill_9_and_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendfsync="always").start()
    try:
        url = server.url
        server.client().set("farm:job:1", "queued")

        server.kill()
        assert not answers(url)
        server.restart()

        assert server.url == url  # same port: clients keep their URL
        assert server.client().get("farm:job:1") == b"queued"
    finally:
        server.stop()


def test_without_aof_a_restart_starts_empty(tmp_path: Path) -> None:
    with RedisServer(tmp_path, appendonly=False) as server:
        server.client().set("k", "v")
        server.restart()
        assert server.client().get("k") is None


def test_a_taken_port_is_an_error_with_the_servers_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        with pytest.raises(ServerError, match="(?s)did not start.*Address already in use"):
            RedisServer(tmp_path, port=port).start(timeout=10)


def test_stop_is_idempotent_and_kill_after_stop_is_harmless(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    server.stop()
    server.stop()
    server.kill()
    assert not server.running


def test_s3_server_serves_http_until_stopped() -> None:
    with S3Server() as server:
        assert server.running
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/moto-api/")
        assert conn.getresponse().status < 500
        conn.close()
    assert not server.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2)
