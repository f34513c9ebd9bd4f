"""Guarantee 5: SIGTERM or Ctrl-C stops a busy worker within 10 s, and nothing is lost or doubled.

The worker is stopped while it is applying continuous traffic, once by SIGTERM (what Docker and
systemd send) and once by SIGINT to its process group (a terminal's Ctrl-C), and restarted each
time. It must exit within 10 s; whatever it had made durable stays, whatever it had not is applied
by the next worker, once: the final totals equal the truth.

A worker can only be stuck where it waits: on Redis. So it is also stopped while Redis is down and
its batch is retrying: the wait must give way to the shutdown, and the batch, never acknowledged,
is applied after Redis and a new worker are back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from agents.embedded import EmbeddedRedis
from tests.chaos.harness import (
    WORKER,
    Background,
    Samples,
    assert_exact,
    landed,
    processed,
    profiles,
    rng_for,
    started,
    traffic,
    wait_for,
)
from tests.chaos.proxy import ProxiedBroker
from tests.chaos.test_broker_outage import with_bad_records
from tests.conftest import Deployment, WorkerProcess

pytestmark = pytest.mark.integration

PROMPT_S = 10.0
FAST = {"stops": (signal.SIGTERM, signal.SIGINT), "seconds": 300}
CHAOS = {"stops": (signal.SIGTERM, signal.SIGINT) * 3, "seconds": 900}


def stop_with(worker: WorkerProcess, sig: signal.Signals) -> float:
    """Send ``sig`` (to the process group, as a terminal does); seconds until the worker exited."""
    assert worker.proc is not None and worker.proc.poll() is None
    started_at = time.monotonic()
    os.killpg(worker.proc.pid, sig)
    try:
        worker.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
    return time.monotonic() - started_at


@pytest.mark.parametrize("profile", profiles(FAST, CHAOS))
def test_busy_worker_stops_promptly_and_resumes_exactly(
    deployment: Deployment, profile: tuple[dict[str, object], int]
) -> None:
    config, seed = profile
    rng = rng_for(5000 + seed)
    planned = traffic(seconds=int(config["seconds"]), rate=40, seed=seed)  # type: ignore[call-overload]
    stops: tuple[signal.Signals, ...] = config["stops"]  # type: ignore[assignment]
    total = len(planned)
    worker = started(deployment.worker(**WORKER))
    feed = Background(deployment, planned, total / (10 * len(stops) + 6))
    applied = 0.0
    took = []
    for sig in stops:
        wait_for(lambda w=worker, a=applied: processed(w) > a, 60, "the worker made no progress")
        time.sleep(rng.uniform(0.2, 1.5))
        applied = processed(worker)
        assert feed.running, "the worker must be busy with traffic when it is stopped"
        seconds = stop_with(worker, sig)
        took.append(f"{sig.name} {seconds:.1f} s")
        assert seconds < PROMPT_S, f"{sig.name} took {seconds:.1f} s\n{worker.log_tail(30)}"
        worker = started(deployment.worker(**WORKER))
    print("stops:", took)
    feed.join()
    assert_exact(worker, deployment, planned)


@pytest.mark.chaos  # cancellation of the retry loop: cheap insurance, slow to set up
def test_worker_waiting_for_redis_stops_promptly(
    own_redis: EmbeddedRedis, deployment: Deployment
) -> None:
    deployment.env["KPI_REDIS_URL"] = own_redis.url
    planned = traffic(seconds=60, rate=40, seed=5)
    worker = started(deployment.worker(**WORKER))
    own_redis.kill()
    feed = Background(deployment, planned, 0)

    def retrying(m: Samples) -> bool:
        return (m.get("kpi_store_retries_total", {}).get(frozenset()) or 0) >= 3

    worker.wait_until(retrying, timeout_s=30)  # the batch is waiting for Redis, backing off
    seconds = stop_with(worker, signal.SIGTERM)
    assert seconds < PROMPT_S, f"SIGTERM took {seconds:.1f} s\n{worker.log_tail(30)}"
    feed.join()
    own_redis.restart()
    assert_exact(started(deployment.worker(**WORKER)), deployment, planned)


@pytest.mark.parametrize(
    "kind",
    [
        "down",  # Faust's own shutdown hangs: the bounded shutdown of agents.app must end it
        pytest.param("writes", marks=pytest.mark.chaos),  # dead letters pending: bounded flush
    ],
)
def test_worker_during_broker_outage_stops_promptly(
    own_broker: ProxiedBroker, deployment: Deployment, kind: str
) -> None:
    deployment.env["KPI_KAFKA_BOOTSTRAP"] = own_broker.bootstrap
    planned = with_bad_records(traffic(seconds=120, rate=40, seed=6), every=5)
    worker = started(deployment.worker(**WORKER))
    feed = Background(deployment, planned, len(planned) / 8)
    wait_for(lambda: processed(worker) > 0, 60, "the worker made no progress")
    if kind == "down":
        own_broker.proxy.cut()
    else:
        own_broker.proxy.refuse_writes = True
    time.sleep(3)  # the worker's fetches, commits or dead-letter sends are failing
    seconds = stop_with(worker, signal.SIGTERM)
    if kind == "down":
        own_broker.proxy.restore()
    else:
        own_broker.proxy.refuse_writes = False
    assert seconds < PROMPT_S, f"SIGTERM took {seconds:.1f} s\n{worker.log_tail(30)}"
    feed.join()
    assert_exact(started(deployment.worker(**WORKER)), deployment, landed(deployment, planned))
