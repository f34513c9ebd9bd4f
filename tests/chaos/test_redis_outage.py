"""Guarantee 3: Redis unavailable, then back; and Redis back *empty*.

Unavailable: Redis is SIGKILLed mid-stream and restarted on the same port and data directory after
the outage (its AOF, ``appendfsync always``, keeps every acknowledged write). Meanwhile the worker
must wait and retry with nothing acknowledged to Kafka, and it is itself SIGKILLed once during the
outage: a worker that had acknowledged records before their effects were durable would then lose
them for good (the restarted worker resumes from the group's committed offsets). After Redis comes
back, the worker catches up by itself and every KPI equals the truth.

Empty: Redis restarts without its data. The worker must say so (``kpi_store_reset_detected 1``
and an ERROR line) and count nothing on the empty store: the running worker, idle then receiving
records, and a restarted worker that never saw the old store.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Sequence

import pytest

from agents.embedded import EmbeddedRedis
from tests.chaos.harness import (
    WORKER,
    Background,
    Planned,
    Samples,
    assert_exact,
    processed,
    profiles,
    publish,
    rng_for,
    started,
    traffic,
    wait_for,
)
from tests.conftest import Deployment, WorkerProcess

pytestmark = pytest.mark.integration

FAST = {"outage_s": 6.0, "seconds": 240}
CHAOS = {"outage_s": 30.0, "seconds": 480}


def gauge(samples: Samples, name: str) -> float | None:
    return samples.get(name, {}).get(frozenset())


@pytest.mark.parametrize("profile", profiles(FAST, CHAOS))
def test_redis_outage_waits_then_catches_up_exactly(
    own_redis: EmbeddedRedis, deployment: Deployment, profile: tuple[dict[str, float], int]
) -> None:
    config, seed = profile
    rng = rng_for(3000 + seed)
    deployment.env["KPI_REDIS_URL"] = own_redis.url
    planned = traffic(seconds=int(config["seconds"]), rate=40, seed=seed)
    worker = started(deployment.worker(**WORKER))
    outage_s = config["outage_s"]
    # The traffic lasts beyond the outage: records keep arriving while Redis is down.
    feed = Background(deployment, planned, len(planned) / (outage_s + 12))
    wait_for(lambda: processed(worker) > 0, 60, "the worker made no progress")
    time.sleep(rng.uniform(0.5, 2.0))
    own_redis.kill()
    down_at = time.monotonic()

    def waiting(m: Samples) -> bool:  # the worker still serves /metrics, says the store is down
        retries = gauge(m, "kpi_store_retries_total") or 0
        return gauge(m, "kpi_store_up") == 0 and retries > 0

    worker.wait_until(waiting, timeout_s=outage_s)
    # A worker crash during the outage: only durable effects may have been acknowledged.
    time.sleep(rng.uniform(0.0, max(0.0, outage_s / 2 - (time.monotonic() - down_at))))
    worker.kill()
    worker = deployment.worker(**WORKER)
    time.sleep(max(0.0, outage_s - (time.monotonic() - down_at)))
    assert feed.running, "the traffic should outlast the outage"
    own_redis.restart()
    feed.join()
    assert_exact(worker, deployment, planned, timeout_s=120)
    assert "STORE RESET" not in worker.log_tail(100_000)


def test_redis_restarted_empty_is_detected_and_nothing_counts_from_zero(
    own_redis: EmbeddedRedis, deployment: Deployment
) -> None:
    deployment.env["KPI_REDIS_URL"] = own_redis.url
    env = deployment.env
    planned = traffic(seconds=120, rate=40, seed=11)
    half = len(planned) // 2
    worker = started(deployment.worker(**WORKER))
    asyncio_publish(env, planned[:half])
    assert_exact(worker, deployment, planned[:half])
    time.sleep(2.5)  # Faust commits the group's offsets every second

    own_redis.kill()
    assert own_redis.data_dir is not None
    shutil.rmtree(own_redis.data_dir)  # the AOF is lost: Redis comes back empty
    own_redis.restart()

    def detected(m: Samples) -> bool:
        return gauge(m, "kpi_store_reset_detected") == 1

    # Idle (no record arrives): the running worker notices the store's identity marker is gone.
    assert_detected(worker, detected)
    # Then records arrive: they are not counted on the empty store.
    asyncio_publish(env, planned[half:])
    assert_detected(worker, detected)
    # A restarted worker, which never saw the old store, detects it too (from the group's
    # committed offsets): it does not take the empty store as a fresh start.
    worker.stop()
    worker = started(deployment.worker(**WORKER))
    assert_detected(worker, detected)


def assert_detected(worker: WorkerProcess, detected: Callable[[Samples], bool]) -> None:
    worker.wait_until(detected, timeout_s=30)
    time.sleep(3)  # give a worker counting up from zero the time to show it
    samples = worker.scrape()
    assert gauge(samples, "kpi_store_reset_detected") == 1
    assert not gauge(samples, "kpi_events_processed_total"), "counted up from zero"
    log = worker.log_tail(100_000)
    assert " ERROR " in log and "STORE RESET DETECTED" in log, log[-3000:]


def asyncio_publish(env: dict[str, str], planned: Sequence[Planned]) -> None:
    asyncio.run(publish(env["KPI_KAFKA_BOOTSTRAP"], env["KPI_EVENTS_TOPIC"], planned))
