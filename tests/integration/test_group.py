"""Two workers of one consumer group share the partitions, and the totals stay exact.

The truth is re-derived from the input itself: the same records, partition by partition, through
the pure domain and the in-memory store.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from agents.simulator import Simulator
from stream.partition import Limits, PartitionState, Record, candidate_ids, decode
from stream.partitioner import partition_for
from stream.store import MemoryStore
from tests.conftest import Deployment, WorkerProcess

pytestmark = pytest.mark.integration

PARTITIONS = 4
GAP_S = 60
KEY = "test-identity-key"
COUNTERS = {
    "kpi_page_views_total": "page_views",
    "kpi_interactions_total": "interactions",
    "kpi_participations_total": "participations",
    "kpi_shares_total": "shares",
    "kpi_visits_total": "visits",
    "kpi_bounced_visits_total": "bounced_visits",
}

Planned = tuple[bytes | None, int, bytes]


def traffic(seconds: int, rate: int, seed: int) -> list[Planned]:
    """Simulated traffic 3 h ago, one tick per event-time second, envelopes per partition."""
    sim = Simulator(PARTITIONS, gap_s=GAP_S, seed=seed)
    start_ms = int(time.time() * 1000) - 3 * 3_600_000
    planned: list[Planned] = []
    for tick in range(seconds):
        per_partition: dict[int, list[dict[str, object]]] = defaultdict(list)
        for event in sim.events(start_ms + tick * 1000, rate):
            per_partition[partition_for(str(event["visitor_id"]), PARTITIONS)].append(event)
        for partition, events in sorted(per_partition.items()):
            if len(events) == 1:  # a single keyed record
                planned.append(
                    (str(events[0]["visitor_id"]).encode(), partition, orjson.dumps(events[0]))
                )
            else:
                planned.append((None, partition, orjson.dumps(events)))
    return planned


def truth(planned: list[Planned]) -> MemoryStore:
    """The KPIs the input implies, computed by the pure domain, partition by partition."""
    store = MemoryStore()
    offsets: dict[int, int] = defaultdict(int)
    by_partition: dict[int, list[Record]] = defaultdict(list)
    for key, partition, value in planned:
        by_partition[partition].append(Record(partition, offsets[partition], key, value))
        offsets[partition] += 1
    limits = Limits(gap_ms=GAP_S * 1000, lateness_ms=600_000, idle_advance_s=3600)

    async def run() -> None:
        for partition, records in by_partition.items():
            state = PartitionState(partition, PARTITIONS, limits, KEY.encode())
            decoded = decode(records)
            delta = state.apply(
                decoded, await store.seen(partition, candidate_ids(decoded)), time.time()
            )
            await store.add_uniques(delta.uniques)
            assert await store.commit(delta, -1, 86_400_000)

    asyncio.run(run())
    return store


async def publish(bootstrap: str, topic: str, planned: list[Planned]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        sends = [await producer.send(topic, v, key=k, partition=p) for k, p, v in planned]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


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

    settings = {
        "KPI_EVENTS_PARTITIONS": str(PARTITIONS),
        "KPI_SESSION_GAP_SECONDS": str(GAP_S),
        "KPI_IDLE_ADVANCE_SECONDS": "3600",
        "KPI_BATCH_MAX_RECORDS": "20",  # many small batches: more interleaving with rebalances
    }
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
