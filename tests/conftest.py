"""Shared fixtures: a real broker and a real Redis on free loopback ports, and worker processes.

The servers are started once per test session and always stopped; each test isolates itself with
its own topic names, consumer group and Redis key prefix.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents.embedded import EmbeddedBroker, EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-chaos", action="store_true", help="run the slow fault-injection suite")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-chaos"):
        return
    skip = pytest.mark.skip(reason="chaos suite: run with `make chaos`")
    for item in items:
        # The marker, not ``item.keywords``: keywords also hold the names of the parent
        # directories, so every test under ``tests/chaos/`` would be skipped, fast subset included.
        if item.get_closest_marker("chaos") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    server = EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(data_dir=tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def metric_samples(text: str) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    """``name -> labels -> value`` from a Prometheus text exposition."""
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


@dataclass
class WorkerProcess:
    """A `kpi worker` subprocess."""

    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log_file: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def start(self) -> None:
        self.log_file = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agents.cli", "worker"],
            env=self.env,
            cwd=ROOT,
            stdout=self.log_file,  # type: ignore[arg-type]
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def scrape_text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=5) as response:
            return response.read().decode()

    def scrape(self) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
        return metric_samples(self.scrape_text())

    def wait_until(
        self,
        predicate: Callable[[dict[str, dict[frozenset[tuple[str, str]], float]]], bool],
        timeout_s: float = 60.0,
    ) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
        """Scrape until ``predicate`` holds; fail with the last scrape and the log tail."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            try:
                last = self.scrape()
                if predicate(last):
                    return last
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(
            f"condition not met in {timeout_s} s; last scrape {last}\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 15.0) -> float:
        """SIGTERM, wait; returns how long it took (SIGKILL after the timeout)."""
        started = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Deployment:
    """Isolated names for one test: topics, group, Redis prefix, and its worker settings."""

    env: dict[str, str]
    tmp_path: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def worker(self, **overrides: str) -> WorkerProcess:
        port = free_port()
        env = {**self.env, "KPI_WEB_PORT": str(port), **overrides}
        n = len(self.workers)
        env["KPI_DATA_DIR"] = str(self.tmp_path / f"faust-{n}")
        handle = WorkerProcess(env, port, self.tmp_path / f"worker-{n}.log")
        handle.start()
        self.workers.append(handle)
        return handle


@pytest.fixture
def deployment(
    broker: EmbeddedBroker, redis_server: EmbeddedRedis, tmp_path: Path
) -> Iterator[Deployment]:
    name = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "KPI_KAFKA_BOOTSTRAP": broker.bootstrap,
        "KPI_REDIS_URL": redis_server.url,
        "KPI_REDIS_PREFIX": f"t{name}",
        "KPI_EVENTS_TOPIC": f"events-{name}",
        "KPI_DLQ_TOPIC": f"dlq-{name}",
        "KPI_GROUP_ID": f"group-{name}",
        "KPI_IDENTITY_KEY": "test-identity-key",
        "KPI_BROKER_SESSION_TIMEOUT_SECONDS": "6",
        "KPI_LOG_LEVEL": "INFO",
    }
    deployment = Deployment(env, tmp_path)
    try:
        yield deployment
    finally:
        for worker in deployment.workers:
            worker.stop()
