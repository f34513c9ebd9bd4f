"""A record larger than the consumer's fetch size per partition is still consumed, whole.

The worker fetches at most 1 MiB per partition and fetch (it bounds what it holds fetched); Kafka,
and the embedded broker, return a first record batch over that limit rather than none.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.chaos.harness import started
from tests.conftest import Deployment

pytestmark = pytest.mark.integration


async def send(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 << 20)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, partition=0)
    finally:
        await producer.stop()


def test_a_record_over_the_fetch_size_is_processed(deployment: Deployment) -> None:
    worker = started(deployment.worker(KPI_EVENTS_PARTITIONS="1"))
    now_ms = int(time.time() * 1000) - 60_000
    events = [
        {
            "event_id": f"big-{i}",
            "type": "page_view",
            "ts": now_ms,
            "campaign_id": "big",
            "visitor_id": "one-visitor",
            "page": "p" * 100,
        }
        for i in range(20_000)
    ]
    big = orjson.dumps(events)
    assert len(big) > 2 * 1024 * 1024
    small = orjson.dumps({**events[0], "event_id": "after"})
    env = deployment.env
    asyncio.run(send(env["KPI_KAFKA_BOOTSTRAP"], env["KPI_EVENTS_TOPIC"], [big, small]))
    worker.wait_until(
        lambda m: m.get("kpi_events_processed_total", {}).get(frozenset()) == 20_001,
        timeout_s=60,
    )
    assert worker.scrape()["kpi_page_views_total"][frozenset({("campaign", "big")})] == 20_001
