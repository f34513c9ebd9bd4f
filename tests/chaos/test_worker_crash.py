"""Guarantee 1: a worker SIGKILLed at random moments, again and again, loses and doubles nothing.

Kills land mid-stream (the worker is flushing batches of 20 records all the time) and during
recovery (a fraction of a second to a few seconds after a restart: joining the group, loading the
partitions, replaying the unacknowledged records). After the last restart, every contract metric
equals the truth re-derived from the input, and per partition the counted event ids are exactly the
valid events (see :mod:`tests.chaos.harness`).
"""

from __future__ import annotations

import time

import pytest

from tests.chaos.harness import (
    WORKER,
    Background,
    assert_exact,
    processed,
    profiles,
    rng_for,
    started,
    traffic,
    wait_for,
)
from tests.conftest import Deployment

pytestmark = pytest.mark.integration

FAST = {"kills": 3, "seconds": 300, "records_per_s": 40}
CHAOS = {"kills": 6, "seconds": 600, "records_per_s": 40}


@pytest.mark.parametrize("profile", profiles(FAST, CHAOS))
def test_sigkill_at_random_moments_loses_and_doubles_nothing(
    deployment: Deployment, profile: tuple[dict[str, int], int]
) -> None:
    config, seed = profile
    rng = rng_for(1000 + seed)
    planned = traffic(seconds=config["seconds"], rate=40, seed=seed)
    worker = started(deployment.worker(**WORKER))
    feed = Background(deployment, planned, config["records_per_s"])
    moments: list[str] = []
    applied = 0.0  # the store's processed total at the previous kill
    for kill in range(config["kills"]):
        if kill % 2 == 0:
            # Mid-stream: once this worker has applied something new, after a random delay.
            progressed = lambda w=worker, a=applied: processed(w) > a  # noqa: E731
            wait_for(progressed, 60, "the worker made no progress")
            time.sleep(rng.uniform(0.0, 1.0))
            moments.append(f"mid-stream at {processed(worker):.0f} events")
        else:
            # During recovery: soon after the restart, while joining, loading or replaying.
            time.sleep(rng.uniform(0.3, 3.0))
            moments.append(f"recovery at {processed(worker):.0f} events")
        assert feed.running, f"traffic ended before kill {kill + 1}: make it longer {moments}"
        applied = processed(worker)
        worker.kill()
        worker = deployment.worker(**WORKER)
    started(worker)
    feed.join()
    print("kills:", moments)
    assert_exact(worker, deployment, planned, timeout_s=120)
