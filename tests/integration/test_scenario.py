"""A scripted scenario through a real broker, a real Redis and a real `kpi worker` process.

Every contract metric is asserted exactly against values computed by hand below.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream.partitioner import partition_for
from tests.conftest import Deployment

pytestmark = pytest.mark.integration

GAP_S = 60
LATENESS_S = 120
# One malformed record or event of each of these reasons is in the scenario.
REJECTED = (
    "invalid_json",
    "not_an_object",
    "missing_field",
    "unknown_type",
    "invalid_utf8",
    "bad_timestamp",
    "too_large",
)


def visitor_on(partition: int, name: str, partitions: int = 2) -> str:
    """A visitor id whose home partition is ``partition``."""
    for i in range(1000):
        candidate = f"{name}{i}"
        if partition_for(candidate, partitions) == partition:
            return candidate
    raise AssertionError("no visitor found")


def ev(event_id: str, kind: str, ts_ms: int, visitor: str, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "type": kind,
        "ts": ts_ms,
        "campaign_id": "c1",
        "visitor_id": visitor,
        **extra,
    }


async def produce(
    bootstrap: str, topic: str, records: list[tuple[bytes | None, int | None, bytes]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, partition, value in records:
            await producer.send_and_wait(topic, value, key=key, partition=partition)
    finally:
        await producer.stop()


async def read_dlq(bootstrap: str, topic: str, count: int) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + 30
        while len(out) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


def value(samples: dict[str, Any], name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(frozenset(labels.items()))


def test_scripted_scenario_every_contract_metric(deployment: Deployment) -> None:
    now_ms = int(time.time() * 1000)
    t0 = (now_ms - 3 * 3_600_000) // 3_600_000 * 3_600_000  # an hour boundary, 2-3 h ago
    a, c, e, z0 = (visitor_on(0, n) for n in ("alice", "carol", "eve", "zed"))
    b, d, z1 = (visitor_on(1, n) for n in ("bob", "dan", "zoe"))
    s = 1000  # ms per second

    def keyed(event: dict[str, Any]) -> tuple[bytes | None, int | None, bytes]:
        return (event["visitor_id"].encode(), None, orjson.dumps(event))

    alice = {"first_name": "Alice", "last_name": "Smith", "email": "alice@example.com"}
    same_alice = {"first_name": " alice ", "last_name": "SMITH", "email": "Alice@Example.com"}
    phase1 = [
        # Alice, visit 1: page view, interaction, participation: 20 s, not a bounce.
        keyed(ev("a1", "page_view", t0, a)),
        keyed(ev("a2", "interaction", t0 + 10 * s, a, action="vote")),
        keyed(ev("a3", "participation", t0 + 20 * s, a, participant=alice)),
        # The same interaction again: a duplicate.
        keyed(ev("a2", "interaction", t0 + 10 * s, a, action="vote")),
        # Bob: one page view, a bounce.
        keyed(ev("b1", "page_view", t0 + 5 * s, b)),
        # Carol: out of order (interaction before the page view), then a share: 15 s.
        keyed(ev("c2", "interaction", t0 + 40 * s, c)),
        keyed(ev("c1", "page_view", t0 + 30 * s, c)),
        keyed(ev("c3", "share", t0 + 45 * s, c, network="x")),
        # Dan, in an unkeyed envelope sent to partition 0 (his home is 1): re-keyed by the
        # worker. The same person as Alice participates: one identity. Plus one bad event.
        (
            None,
            0,
            orjson.dumps(
                [
                    ev("d1", "page_view", t0 + 45 * s, d),
                    {**ev("d2", "participation", t0 + 50 * s, d), "participant": same_alice},
                    {"event_id": "bad1", "type": "page_view", "ts": t0, "visitor_id": d},
                ]
            ),
        ),
        # Alice comes back after more than the gap: a second visit, a bounce.
        keyed(ev("a4", "page_view", t0 + 200 * s, a)),
        # Malformed records, one per reason.
        (b"x", 0, b"{not json"),
        (b"x", 0, b"[1]"),
        (b"x", 0, orjson.dumps(ev("u1", "purchase", t0, a))),
        (b"x", 0, b"\xff\xfe{}"),
        (b"x", 0, orjson.dumps(ev("t1", "page_view", 0, a) | {"ts": "2026-01-01T10:00:00"})),
        (b"x", 1, orjson.dumps(ev("big", "page_view", t0, b, page="p" * 70_000))),
    ]
    phase2 = [
        # Closers: one late page view per partition moves both watermarks to t0 + 1000 s.
        keyed(ev("z0", "page_view", t0 + 1000 * s, z0)),
        keyed(ev("z1", "page_view", t0 + 1000 * s, z1)),
        # Eve, 900 s behind partition 0's watermark (lateness 120 s): late.
        keyed(ev("e1", "page_view", t0 + 100 * s, e)),
    ]

    worker = deployment.worker(
        KPI_EVENTS_PARTITIONS="2",
        KPI_SESSION_GAP_SECONDS=str(GAP_S),
        KPI_ALLOWED_LATENESS_SECONDS=str(LATENESS_S),
        KPI_IDLE_ADVANCE_SECONDS="3600",
    )
    worker.wait_until(lambda m: "kpi_store_up" in m)
    env = deployment.env
    asyncio.run(produce(env["KPI_KAFKA_BOOTSTRAP"], env["KPI_EVENTS_TOPIC"], phase1))
    worker.wait_until(lambda m: value(m, "kpi_events_processed_total") == 10)
    asyncio.run(produce(env["KPI_KAFKA_BOOTSTRAP"], env["KPI_EVENTS_TOPIC"], phase2))
    m = worker.wait_until(lambda m: value(m, "kpi_events_processed_total") == 13)

    # Counters: a1 b1 c1 d1 a4 z0 z1 e1 | a2 c2 | a3 d2 | c3.
    assert value(m, "kpi_page_views_total", campaign="c1") == 8
    assert value(m, "kpi_interactions_total", campaign="c1") == 2
    assert value(m, "kpi_participations_total", campaign="c1") == 2
    assert value(m, "kpi_shares_total", campaign="c1") == 1
    # Closed visits: Alice 1 (20 s), Bob (bounce), Carol (15 s), Dan (5 s), Alice 2 (bounce).
    assert value(m, "kpi_visits_total", campaign="c1") == 5
    assert value(m, "kpi_bounced_visits_total", campaign="c1") == 2
    assert value(m, "kpi_visit_duration_seconds_total", campaign="c1") == 40
    assert value(m, "kpi_open_visits") == 2  # the closers' own visits
    # Pipeline health.
    assert value(m, "kpi_events_duplicate_total") == 1
    assert value(m, "kpi_events_late_total") == 1
    assert value(m, "kpi_events_forwarded_total") == 2
    for reason in REJECTED:
        assert value(m, "kpi_events_rejected_total", reason=reason) == 1, reason
    assert value(m, "kpi_events_rejected_total", reason="invalid_field") == 0
    for partition in ("0", "1"):
        wm = value(m, "kpi_watermark_timestamp_seconds", partition=partition)
        assert wm == (t0 + 1000 * s) / 1000
    # Windows end at t0 + 1000 s. 1h and 24h hold every visit (they started at t0 .. t0+200 s).
    for window in ("1h", "24h"):
        assert value(m, "kpi_bounce_ratio", campaign="c1", window=window) == pytest.approx(2 / 5)
        assert value(
            m, "kpi_interactions_per_visit", campaign="c1", window=window
        ) == pytest.approx(2 / 5)
        assert value(
            m, "kpi_average_visit_duration_seconds", campaign="c1", window=window
        ) == pytest.approx(8.0)
        # Visitors a b c d z0 z1 e; participating: a, d; one identity (Alice = alice).
        assert value(m, "kpi_unique_visitors", campaign="c1", window=window) == 7
        assert value(m, "kpi_participation_ratio", campaign="c1", window=window) == pytest.approx(
            2 / 7
        )
        assert value(m, "kpi_unique_participants", campaign="c1", window=window) == 1
    # 5m (buckets t0+12 min .. t0+16 min) holds no closed visit: its ratios are not exported.
    assert value(m, "kpi_bounce_ratio", campaign="c1", window="5m") is None
    assert value(m, "kpi_average_visit_duration_seconds", campaign="c1", window="5m") is None
    assert value(m, "kpi_unique_visitors", campaign="c1", window="5m") == 2
    assert value(m, "kpi_participation_ratio", campaign="c1", window="5m") == 0
    assert value(m, "kpi_unique_participants", campaign="c1", window="5m") == 0

    # Every rejection is in the dead-letter topic, with the contract's headers.
    letters = asyncio.run(read_dlq(env["KPI_KAFKA_BOOTSTRAP"], env["KPI_DLQ_TOPIC"], 7))
    reasons = sorted(dict(r.headers)["kpi.error.reason"].decode() for r in letters)
    assert reasons == sorted(REJECTED)
    for record in letters:
        headers = dict(record.headers)
        assert headers["kpi.source.topic"].decode() == env["KPI_EVENTS_TOPIC"]
        assert {"kpi.error.message", "kpi.source.partition", "kpi.source.offset"} <= set(headers)
    utf8 = next(r for r in letters if dict(r.headers)["kpi.error.reason"] == b"invalid_utf8")
    assert utf8.value == b"\xff\xfe{}"  # the original bytes

    # Raw identities never reach Redis or the logs.
    assert "alice@example.com" not in worker.log_tail(10_000).lower()
    assert not redis_contains(env["KPI_REDIS_URL"], env["KPI_REDIS_PREFIX"], b"alice@example.com")


def redis_contains(url: str, prefix: str, needle: bytes) -> bool:
    """Whether any key or stored value under ``prefix`` contains ``needle`` (case-folded)."""
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{prefix}:*"):
            kind = client.type(key)
            if kind == b"hash":
                blob = b"".join(k + v for k, v in client.hgetall(key).items())
            elif kind == b"zset":
                blob = b"".join(client.zrange(key, 0, -1))
            else:
                blob = client.dump(key) or b""
            if needle in (key + blob).lower():
                return True
    finally:
        client.close()
    return False
