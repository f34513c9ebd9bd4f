"""Tests of :mod:`agents.metrics`: the page is what prometheus_client's registry would write."""

from __future__ import annotations

import random
from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest

from agents.metrics import StoreCollector, WorkerMetrics
from stream.kpis import COUNTERS, KpiSnapshot, WindowData
from stream.partition import (
    BOUNCED,
    DURATION_MS,
    INTERACTIONS,
    UNIQUE_PARTICIPANTS,
    UNIQUE_PARTICIPATING_VISITORS,
    UNIQUE_VISITORS,
    VISITS,
)
from stream.windows import WINDOWS
from tests.stream.factories import H_MS


def realistic_snapshot(campaigns: int = 300, seed: int = 7) -> KpiSnapshot:
    """A store snapshot like a busy one: every kind of value, odd campaign names included."""
    rng = random.Random(seed)
    snap = KpiSnapshot(newest_event_ms=H_MS + 123_456, open_visits=4321)
    names = [f"campaign-{i:04d}" for i in range(campaigns)]
    names += ['quo"te', "back\\slash", "new\nline", "café ☕", ""]
    for name in names:
        snap.counters[name] = Counter(
            {kpi.counter: rng.choice([0, 1, 7, rng.randrange(10**9)]) for kpi in COUNTERS}
        )
        for spec in WINDOWS:
            visits = rng.choice([0, 0, 1, 3, rng.randrange(10**6)])
            sums = Counter(
                {
                    VISITS: visits,
                    BOUNCED: rng.randint(0, visits),
                    INTERACTIONS: rng.randrange(3 * visits + 1),
                    DURATION_MS: rng.randrange(1800_000 * visits + 1),
                }
            )
            visitors = rng.randrange(2 * visits + 2)
            uniques = {
                UNIQUE_VISITORS: visitors,
                UNIQUE_PARTICIPATING_VISITORS: rng.randint(0, visitors + 2),  # HLL: may exceed
                UNIQUE_PARTICIPANTS: rng.randrange(visitors + 1),
            }
            snap.windows[name, spec.label] = WindowData(sums, rng.choice([uniques, {}]))
    snap.pipeline.update({"processed": 10**7 + 3, "duplicates": 12, "rejected:invalid_json": 2})
    snap.watermarks_ms.update({0: H_MS, 1: H_MS + 1, 2: -1, 3: H_MS + 999_999})
    snap.offsets.update({0: 10, 1: 11, 2: -1, 3: 12})
    return snap


def reference(collector: StoreCollector) -> bytes:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry)


def test_the_store_families_are_generate_latests_byte_for_byte() -> None:
    collector = StoreCollector()
    collector.snapshot = realistic_snapshot()
    assert collector.render() == reference(collector)


def test_a_new_snapshot_is_rendered_anew() -> None:
    # The text is reused for the same snapshot object only (stores return it again while
    # nothing changed), never for another one.
    collector = StoreCollector()
    collector.snapshot = realistic_snapshot(campaigns=5, seed=1)
    first = collector.render()
    assert collector.render() == first
    collector.snapshot = realistic_snapshot(campaigns=5, seed=2)
    assert collector.render() == reference(collector) != first
    collector.snapshot = None
    assert collector.render() == reference(collector)


def test_without_a_snapshot_only_the_store_is_down() -> None:
    collector = StoreCollector()
    assert collector.render() == reference(collector)
    assert b"kpi_store_up 0.0\n" in collector.render()


def test_an_empty_store() -> None:
    collector = StoreCollector()
    collector.snapshot = KpiSnapshot()
    assert collector.render() == reference(collector)


def test_the_page_is_the_store_then_the_worker_metrics() -> None:
    # What the page was when the collector was registered first in the worker's registry.
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.store.snapshot = realistic_snapshot(campaigns=20)
    metrics.consumer_lag.labels("3").set(17)
    metrics.flush_seconds.observe(0.02)
    metrics.store_retries.inc()
    whole = CollectorRegistry()
    whole.register(metrics.store)
    whole.register(metrics.registry)
    assert metrics.render() == generate_latest(whole)
