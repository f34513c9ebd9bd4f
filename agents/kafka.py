"""Kafka plumbing of the worker: topic creation, the dead-letter and re-key publisher."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from agents.settings import Settings
from stream.partition import Delta

log = logging.getLogger(__name__)


async def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> int:
    """Create the events and dead-letter topics when missing.

    Returns:
        The number of partitions of the events topic (as it exists, which may differ from
        ``KPI_EVENTS_PARTITIONS`` when it was created elsewhere).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except Exception as exc:  # broker not up yet: retry until the deadline
            if asyncio.get_running_loop().time() > deadline:
                raise ConnectionError(f"Kafka at {settings.kafka_bootstrap}: {exc}") from exc
            await asyncio.sleep(0.5)
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, settings.events_partitions, settings.replication_factor)
            for name in (settings.events_topic, settings.dlq_topic)
            if name not in existing
        ]
        if wanted:
            try:
                await admin.create_topics(wanted)
                log.info("created topics %s", [t.name for t in wanted])
            except TopicAlreadyExistsError:
                pass  # another worker created them meanwhile
        described = await admin.describe_topics([settings.events_topic])
        return len(described[0]["partitions"])
    finally:
        await admin.close()


def dlq_headers(delta: Delta, topic: str, index: int) -> list[tuple[str, bytes]]:
    """The contract's headers of one dead letter of ``delta``."""
    letter = delta.dead_letters[index]
    record, rejection = letter.record, letter.rejection
    headers = [
        *record.headers,
        ("kpi.error.reason", rejection.reason.value.encode()),
        ("kpi.error.message", rejection.message.encode()),
        ("kpi.source.topic", topic.encode()),
        ("kpi.source.partition", str(record.partition).encode()),
        ("kpi.source.offset", str(record.offset).encode()),
    ]
    if rejection.index is not None:
        headers.append(("kpi.source.index", str(rejection.index).encode()))
    return headers


class PublisherStoppedError(Exception):
    """The publisher was stopped (the worker is shutting down): nothing more is sent."""


class Publisher:
    """Publishes a delta's dead letters and re-keyed events, and waits until Kafka has them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._stopped = False

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._stopped:
                raise PublisherStoppedError("the worker is shutting down")
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self.settings.kafka_bootstrap,
                    acks="all",
                    linger_ms=5,
                    max_request_size=16 * 1024 * 1024,
                    # Fail a send after 10 s instead of aiokafka's 40 s: a broker outage then
                    # surfaces as a retried batch (log line, kpi_store_retries) and the retry loop
                    # of agents.processor sends again once the broker is back; nothing is acked
                    # meanwhile.
                    request_timeout_ms=10_000,
                )
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()  # a failed start leaves connections behind otherwise
                    raise
                self._producer = producer
            return self._producer

    async def publish(self, delta: Delta) -> None:
        """Send and await every record of ``delta`` (raises when Kafka fails)."""
        if not (delta.dead_letters or delta.forwards):
            return
        producer = await self._started()
        settings = self.settings
        sends = []
        for i, letter in enumerate(delta.dead_letters):
            sends.append(
                await producer.send(
                    settings.dlq_topic,
                    value=letter.rejection.raw,
                    key=letter.record.key,
                    headers=dlq_headers(delta, settings.events_topic, i),
                )
            )
        for forward in delta.forwards:
            sends.append(
                await producer.send(
                    settings.events_topic, value=forward.value, key=forward.visitor_id.encode()
                )
            )
        await asyncio.gather(*sends)

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Close the producer, flushing for at most ``timeout_s``; never start it again.

        Sends still pending belong to batches that are not acknowledged (``publish`` returns only
        once Kafka has every record): the next owner of their partitions sends them again. So a
        broker that does not answer must not hold the shutdown up: flushing is bounded.
        """
        async with self._lock:
            self._stopped = True
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), timeout_s)
            except TimeoutError:
                log.warning("dead-letter producer not flushed in %.0f s: closing anyway", timeout_s)
