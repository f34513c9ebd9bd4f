"""Two workers of one consumer group share the partitions, and the totals stay exact.

The truth is re-derived from the input itself: the same records, partition by partition, through
the pure domain and the in-memory store.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.chaos.harness import WORKER, publish, traffic, truth
from tests.conftest import Deployment, WorkerProcess

pytestmark = pytest.mark.integration

COUNTERS = {
    "kpi_page_views_total": "page_views",
    "kpi_interactions_total": "interactions",
    "kpi_participations_total": "participations",
    "kpi_shares_total": "shares",
    "kpi_visits_total": "visits",
    "kpi_bounced_visits_total": "bounced_visits",
}


def totals(worker: WorkerProcess) -> dict[tuple[str, str], float]:
    samples = worker.scrape()
    out: dict[tuple[str, str], float] = {}
    for metric in COUNTERS:
        for labels, value in samples.get(metric, {}).items():
            out[metric, dict(labels)["campaign"]] = value
    return out


def test_two_workers_share_partitions_and_totals_stay_exact(deployment: Deployment) -> None:
    planned = traffic(seconds=240, rate=40, seed=7)
    expected_store = truth(planned)
    expected_snapshot = asyncio.run(expected_store.read())
    expected = {
        (metric, campaign): float(counters.get(name, 0))
        for campaign, counters in expected_snapshot.counters.items()
        for metric, name in COUNTERS.items()
    }
    events = sum(expected_snapshot.pipeline.values())
    assert expected_snapshot.pipeline["processed"] == events > 5000
    assert sum(v for (m, _), v in expected.items() if m == "kpi_visits_total") > 500

    settings = WORKER  # many small batches: more interleaving with the rebalance
    first = deployment.worker(**settings)
    first.wait_until(lambda m: "kpi_store_up" in m)
    bootstrap, topic = deployment.env["KPI_KAFKA_BOOTSTRAP"], deployment.env["KPI_EVENTS_TOPIC"]
    half = len(planned) // 2
    asyncio.run(publish(bootstrap, topic, planned[:half]))
    second = deployment.worker(**settings)  # joins the group mid-stream: a rebalance
    asyncio.run(publish(bootstrap, topic, planned[half:]))

    def done(m: dict[str, dict[frozenset[tuple[str, str]], float]]) -> bool:
        processed = m.get("kpi_events_processed_total", {}).get(frozenset())
        return processed == events

    first.wait_until(done, timeout_s=120)
    second.wait_until(done, timeout_s=60)
    assert totals(first) == expected
    assert totals(second) == expected  # any worker's scrape is complete
    # Both took part: each exports lag for the partitions it owns.
    owned = [
        {dict(labels)["partition"] for labels in w.scrape().get("kpi_consumer_lag", {})}
        for w in (first, second)
    ]
    assert all(owned), f"a worker owns no partition: {owned}"
