"""Fixtures of the fault suite: servers a test may kill, wipe or pause without harming the others.

The session's shared broker and Redis (``tests/conftest.py``) stay untouched: a test that crashes
Redis or pauses the broker gets its own, started here and always stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.embedded import EmbeddedRedis
from tests.chaos.proxy import ProxiedBroker


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test only (AOF, ``appendfsync always``), to crash and restart."""
    server = EmbeddedRedis(data_dir=tmp_path / "redis", log_path=tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[ProxiedBroker]:
    """A broker of this test only, behind a proxy: to freeze, or to cut off, and bring back."""
    server = ProxiedBroker(log_path=tmp_path / "broker.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
