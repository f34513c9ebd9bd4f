"""Guarantee 7: late events count as events, never in visits; a replay gives the same KPIs.

Late events (older than their partition's watermark minus the allowed lateness, 600 s) are mixed
into the traffic, from visitors with visits open or closed and from new ones. Checked by hand, not
only against the truth: ``kpi_events_late_total`` is their number; the event counters hold them
(the counters of the input without them, plus them); every visit KPI (visits, bounces, durations,
bounce ratio, interactions per visit, mean duration) equals that of the input without them.

Then the same topic is replayed by a new consumer group into a new key prefix, the way KPIs are
rebuilt after a store loss (docs/reliability.md): every KPI is identical, HyperLogLogs included.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict

import orjson
import pytest

from tests.chaos.harness import (
    LATENESS_S,
    WORKER,
    Planned,
    Samples,
    assert_exact,
    expected_samples,
    mismatches,
    profiles,
    publish,
    rng_for,
    started,
    traffic,
    truth,
)
from tests.conftest import Deployment

pytestmark = pytest.mark.integration

FAST = {"seconds": 240, "late": 40}
CHAOS = {"seconds": 480, "late": 120}
VISIT_KPIS = (
    "kpi_visits_total",
    "kpi_bounced_visits_total",
    "kpi_visit_duration_seconds_total",
    "kpi_bounce_ratio",
    "kpi_interactions_per_visit",
    "kpi_average_visit_duration_seconds",
    "kpi_open_visits",
)
COUNTER_OF = {
    "page_view": "kpi_page_views_total",
    "interaction": "kpi_interactions_total",
    "participation": "kpi_participations_total",
    "share": "kpi_shares_total",
}


def events_of(value: bytes) -> list[dict[str, object]]:
    decoded = orjson.loads(value)
    return decoded if isinstance(decoded, list) else [decoded]


def late_events(valid: list[Planned], count: int, seed: int) -> list[Planned]:
    """``count`` late events, keyed by visitors of the traffic (half of them) or new ones."""
    rng = rng_for(7000 + seed)
    newest: dict[int, int] = defaultdict(lambda: -1)
    visitors: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for _key, partition, value in valid:
        for event in events_of(value):
            newest[partition] = max(newest[partition], int(event["ts"]))  # type: ignore[call-overload]
            visitors[partition].append((str(event["visitor_id"]), str(event["campaign_id"])))
    out: list[Planned] = []
    for i in range(count):
        partition = i % len(newest)
        visitor, campaign = rng.choice(visitors[partition])
        kind = rng.choice(tuple(COUNTER_OF))
        event = {
            "event_id": f"late-{seed}-{i}",
            "type": kind,
            # Behind the partition's watermark by more than the lateness.
            "ts": newest[partition] - (LATENESS_S + rng.randint(1, 3600)) * 1000,
            "campaign_id": campaign,
            "visitor_id": visitor,
        }
        out.append((visitor.encode(), partition, orjson.dumps(event)))
    return out


def store_derived(samples: Samples) -> Samples:
    """The samples read from the store (the same on every worker), not the worker's own."""
    local = ("kpi_consumer_lag", "kpi_flush", "kpi_store_retries", "kpi_partition_fence")
    local += ("kpi_batch_records", "kpi_store_reset", "kpi_store_up")
    return {k: v for k, v in samples.items() if not k.startswith(local)}


@pytest.mark.parametrize("profile", profiles(FAST, CHAOS))
def test_late_events_and_replay(
    deployment: Deployment, profile: tuple[dict[str, int], int]
) -> None:
    config, seed = profile
    valid = traffic(seconds=config["seconds"], rate=40, seed=70 + seed)
    half = len(valid) // 2
    late = late_events(valid[:half], config["late"], seed)
    planned = valid[:half] + late + valid[half:]
    redis_url = deployment.env["KPI_REDIS_URL"]
    expected = expected_samples(truth(planned), redis_url)
    without_late = expected_samples(truth(valid), redis_url)

    # By hand: the late events are counted as events, and as late; visits never see them.
    assert expected["kpi_events_late_total"][frozenset()] == len(late)
    per_counter: Counter[tuple[str, frozenset[tuple[str, str]]]] = Counter()
    for _key, _partition, value in late:
        (event,) = events_of(value)
        campaign = frozenset({("campaign", str(event["campaign_id"]))})
        per_counter[COUNTER_OF[str(event["type"])], campaign] += 1
    for name in COUNTER_OF.values():
        for labels, total in expected[name].items():
            assert total == without_late[name].get(labels, 0) + per_counter[name, labels], name
    visit_kpis = {name: expected[name] for name in VISIT_KPIS}
    assert not mismatches({name: without_late[name] for name in VISIT_KPIS}, visit_kpis)

    env = deployment.env
    worker = started(deployment.worker(**WORKER))
    asyncio.run(publish(env["KPI_KAFKA_BOOTSTRAP"], env["KPI_EVENTS_TOPIC"], planned))
    first = assert_exact(worker, deployment, planned)
    worker.stop()

    # Replay: the same topic, a new consumer group, a new key prefix.
    env["KPI_GROUP_ID"] += "-replay"
    env["KPI_REDIS_PREFIX"] += "-replay"
    replay = assert_exact(started(deployment.worker(**WORKER)), deployment, planned)
    assert not mismatches(store_derived(first), store_derived(replay))
