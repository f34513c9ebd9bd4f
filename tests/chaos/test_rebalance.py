"""Guarantee 2: rebalances during traffic keep the totals exact.

- A second worker joins, then leaves, during traffic: the first worker gives half of its partitions
  to the newcomer, then takes them back when it leaves (by SIGTERM, or by SIGKILL in the chaos runs,
  where the group only notices after the session timeout). A worker that kept the state of a
  partition it had lost would count twice; one that acked too early would lose records.
- A zombie: a worker frozen in the middle of a flush is evicted from the group, another worker
  applies the same records, then the frozen one wakes up and finishes its flush with its stale
  state. The store must refuse that commit (the fence on the partition's applied offset).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from agents.embedded import EmbeddedRedis
from tests.chaos.harness import (
    PARTITIONS,
    WORKER,
    Background,
    Samples,
    assert_exact,
    processed,
    profiles,
    publish,
    rng_for,
    started,
    traffic,
    truth,
    wait_for,
)
from tests.conftest import Deployment, WorkerProcess

pytestmark = pytest.mark.integration

FAST = {"rounds": 1, "seconds": 300}
CHAOS = {"rounds": 3, "seconds": 600}


def owned(worker: WorkerProcess) -> set[str]:
    """Partitions the worker exports a lag for: the ones assigned to it."""
    try:
        lag = worker.scrape().get("kpi_consumer_lag", {})
    except OSError:
        return set()
    return {dict(labels)["partition"] for labels in lag}


@pytest.mark.parametrize("profile", profiles(FAST, CHAOS))
def test_worker_joins_and_leaves_during_traffic(
    deployment: Deployment, profile: tuple[dict[str, int], int]
) -> None:
    config, seed = profile
    rng = rng_for(2000 + seed)
    planned = traffic(seconds=config["seconds"], rate=40, seed=seed)
    first = started(deployment.worker(**WORKER))
    rounds = config["rounds"]
    feed = Background(deployment, planned, len(planned) / (22 * rounds + 6))
    for round_ in range(rounds):
        before = processed(first)
        wait_for(lambda b=before: processed(first) > b, 60, "no progress")
        second = started(deployment.worker(**WORKER))
        # Joined: both own partitions, and both apply records.
        wait_for(lambda s=second: bool(owned(s) and owned(first)), 60, "no rebalance")
        time.sleep(rng.uniform(1.0, 4.0))
        assert feed.running, f"traffic ended before worker 2 left (round {round_ + 1})"
        if seed and rng.random() < 0.5:
            second.kill()
        else:
            assert second.stop() < 10
        # Left: the first worker owns every partition again.
        wait_for(lambda: len(owned(first)) == PARTITIONS, 60, "partitions not taken back")
    feed.join()
    assert_exact(first, deployment, planned)


def test_zombie_worker_commit_is_fenced(own_redis: EmbeddedRedis, deployment: Deployment) -> None:
    deployment.env["KPI_REDIS_URL"] = own_redis.url
    # A short session: the frozen worker is evicted and its partitions applied by the other one
    # well before its own Redis reads time out (10 s), so it wakes up with its stale answers.
    deployment.env["KPI_BROKER_SESSION_TIMEOUT_SECONDS"] = "3"
    env = deployment.env
    planned = traffic(seconds=120, rate=40, seed=21)
    half = len(planned) // 2
    bootstrap, topic = env["KPI_KAFKA_BOOTSTRAP"], env["KPI_EVENTS_TOPIC"]
    zombie = started(deployment.worker(**WORKER))
    asyncio.run(publish(bootstrap, topic, planned[:half]))
    other = started(deployment.worker(**WORKER))
    wait_for(lambda: bool(owned(zombie) and owned(other)), 60, "no rebalance")
    assert_exact(zombie, deployment, planned[:half])
    assert zombie.proc is not None and own_redis.pid is not None

    # Redis stalls: both workers fetch the next records and wait mid-flush for Redis's answers.
    os.kill(own_redis.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        asyncio.run(publish(bootstrap, topic, planned[half:]))
        time.sleep(1.0)
        os.killpg(zombie.proc.pid, signal.SIGSTOP)  # frozen mid-flush
        frozen_at = time.monotonic()
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    try:
        # The group evicts the frozen worker; the other one takes over and applies everything.
        want = asyncio.run(truth(planned).read()).pipeline["processed"]

        def took_over(m: Samples) -> bool:
            return m.get("kpi_events_processed_total", {}).get(frozenset()) == want

        other.wait_until(took_over, timeout_s=60)
    finally:
        os.killpg(zombie.proc.pid, signal.SIGCONT)
        print(f"zombie frozen for {time.monotonic() - frozen_at:.1f} s")
    # The zombie finishes its flush with state loaded before the takeover, then rejoins.
    wait_for(lambda: bool(owned(zombie)), 60, "the zombie did not rejoin")
    assert_exact(other, deployment, planned)
    # Its stale commit was refused by the fence (so this test did exercise it).
    fenced = zombie.scrape().get("kpi_partition_fence_lost_total", {}).get(frozenset())
    assert fenced, "the frozen worker was not caught mid-flush"
