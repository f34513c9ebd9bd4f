"""Redis durability settings: the demo, the tests and the compose stack fsync every write.

A Redis crash must not lose a write it acknowledged: the worker treats an acknowledged commit as
counted and lets Kafka forget the records (docs/reliability.md). Only ``appendfsync always``
guarantees that when the machine itself crashes; this test keeps the shipped settings on it.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import yaml

from agents.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[2]


def test_compose_redis_fsyncs_every_write() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert options.get("--appendonly") == "yes"
    assert options.get("--appendfsync") == "always"


def test_embedded_redis_fsyncs_every_write_by_default() -> None:
    default = inspect.signature(EmbeddedRedis).parameters["appendfsync"].default
    assert default == "always"
    # The demo keeps that default (it must not pass another mode).
    demo = (ROOT / "agents" / "demo.py").read_text()
    calls = re.findall(r"EmbeddedRedis\(([^)]*)\)", demo)
    assert calls and all("appendfsync" not in c or '"always"' in c for c in calls)
