"""Tests of :mod:`agents.redis_client`: commands packed by hiredis, byte for byte as redis-py."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from agents.embedded import EmbeddedRedis
from agents.redis_client import HiredisPackConnection, connect


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("SET", "k", "v"), id="strings"),
        pytest.param(("SET", b"k", b"\x00\xff\r\n"), id="binary"),
        pytest.param(("HSET", "h", "é", "日本"), id="unicode"),
        pytest.param(("ZADD", "z", 1717000000123, "m", 0.1, "n", -3, "o", 1e20, "p"), id="numbers"),
        pytest.param(("CONFIG GET", "maxmemory"), id="two-word command"),
        pytest.param((b"CONFIG SET", b"a", b"b"), id="two-word command as bytes"),
        pytest.param(("EVALSHA", "0" * 40, 3000, *(f"k{i}" for i in range(3000))), id="many"),
        pytest.param(("SET", "k", "x" * 100_000), id="a large value"),
    ],
)
def test_packs_as_redis_py_does(command: tuple[object, ...]) -> None:
    ours = b"".join(HiredisPackConnection().pack_command(*command))  # type: ignore[arg-type]
    theirs = b"".join(Connection().pack_command(*command))  # type: ignore[arg-type]
    assert ours == theirs


def test_what_hiredis_refuses_goes_to_redis_py() -> None:
    packed = HiredisPackConnection().pack_command("SET", "k", memoryview(b"v"))
    assert b"".join(bytes(p) for p in packed) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    with pytest.raises(DataError):
        HiredisPackConnection().pack_command("SET", "k", None)  # type: ignore[arg-type]


async def test_a_client_talks_to_a_real_server(redis_server: EmbeddedRedis) -> None:
    client = connect(redis_server.url)
    try:
        assert client.connection_pool.connection_class is HiredisPackConnection
        await client.set("client-test", "é\x00")
        assert await client.get("client-test") == "é\x00".encode()
        keys = [f"client-test:{{t}}:{i}" for i in range(2000)]
        script = client.register_script("return #KEYS")
        assert await script(keys=keys, args=["x"]) == 2000
    finally:
        await client.delete("client-test")
        await client.aclose()


def test_tls_and_unix_urls_keep_redis_pys_connections() -> None:
    assert connect("rediss://localhost:6380/0").connection_pool.connection_class is not (
        HiredisPackConnection
    )
    assert connect("unix:///tmp/redis.sock").connection_pool.connection_class is not (
        HiredisPackConnection
    )
