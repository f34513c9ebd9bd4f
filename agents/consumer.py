"""Faust's Kafka consumer, delivering the events topic in bulk.

Faust hands every fetched record to its conductor one at a time: per record it races the delivery
against a rebalance with ``wait_first`` (two tasks), builds an ``Event`` and puts it on a channel
queue. Measured here, that path was over half of a worker's CPU on one-event records, against
13 % for the worker's own processing. :class:`BulkConsumer` keeps everything else of Faust's
consumer (the group, rebalances, the thread that talks to Kafka, read offsets and gaps, acks and
offset commits) and changes only the hand-off: the records of one fetch go to a
:class:`RecordBuffer` in one step, bounded in records and bytes, and the consuming task takes
batches from it. Records of any other topic still go through the conductor.

:class:`BulkTransport` also sets the consumer's fetch wait, which Faust hard-codes to 1.5 s: a
broker that answers a fetch only when that wait expires (Tansu does when the partition has no new
data) would otherwise add up to 1.5 s of latency to a quiet partition's next record.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import Any, ClassVar, cast

import aiokafka
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import Message

__all__ = ["BulkConsumer", "BulkTransport", "RecordBuffer"]


class RecordBuffer:
    """Records fetched and not taken yet, bounded in records and bytes.

    The consumer puts a whole fetch at once (so a bound can be overshot by one fetch) and then
    waits for room before it fetches again; the consuming task takes batches.

    Args:
        max_records: Records held before the consumer waits.
        max_bytes: Bytes of record values held before the consumer waits.
    """

    def __init__(self, max_records: int, max_bytes: int) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._messages: deque[Message] = deque()
        self._bytes = 0
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def full(self) -> bool:
        return len(self._messages) >= self.max_records or self._bytes >= self.max_bytes

    def put_many(self, messages: list[Message]) -> None:
        """Append ``messages`` (never blocks: call :meth:`wait_room` before the next fetch)."""
        if not messages:
            return
        self._messages.extend(messages)
        self._bytes += sum(len(m.value or b"") for m in messages)
        self._readable.set()
        if self.full:
            self._room.clear()

    async def wait_room(self) -> None:
        """Wait until the buffer is below its bounds."""
        await self._room.wait()

    async def take(self, max_records: int, max_bytes: int, within_s: float) -> list[Message]:
        """Wait for a record, then return up to ``max_records``/``max_bytes`` of them.

        Waits up to ``within_s`` after the first record for the batch to fill: fewer, larger
        batches cost less per record, and the wait bounds the latency it adds.
        """
        while not self._messages:
            self._readable.clear()
            await self._readable.wait()
        if len(self._messages) < max_records and within_s > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + within_s
            while len(self._messages) < max_records and self._bytes < max_bytes:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._readable.clear()
                try:
                    await asyncio.wait_for(self._readable.wait(), remaining)
                except TimeoutError:
                    break
        batch: list[Message] = []
        size = 0
        messages = self._messages
        while messages and len(batch) < max_records and size < max_bytes:
            message = messages.popleft()
            batch.append(message)
            size += len(message.value or b"")
        self._bytes -= size
        if not self.full:
            self._room.set()
        return batch

    def drop(self, partitions: Iterable[int] | None = None) -> int:
        """Forget the records of ``partitions`` (all when None); how many were dropped.

        After a rebalance Faust seeks back to the committed offsets and fetches them again.
        """
        wanted = None if partitions is None else set(partitions)
        kept = [m for m in self._messages if wanted is not None and m.partition not in wanted]
        dropped = len(self._messages) - len(kept)
        self._messages = deque(kept)
        self._bytes = sum(len(m.value or b"") for m in kept)
        if not self.full:
            self._room.set()
        return dropped


class BulkConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, putting the records of ``bulk_topic`` in ``buffer`` per fetch.

    ``_drain_messages`` is Faust's fetch loop (faust-streaming 0.11, ``faust.transport.consumer``)
    with the per-record ``wait_first(callback(message), ...)`` replaced, for the bulk topic, by one
    :meth:`RecordBuffer.put_many` per fetch and one wait for room, still raced against a rebalance
    (``suspend_flow``) as Faust does.
    """

    buffer: RecordBuffer | None = None
    bulk_topic: str = ""
    fetch_max_wait_ms: int = 1500

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - the fetch loop
        buffer = self.buffer
        if buffer is None:
            await super()._drain_messages(fetcher)
            return
        callback = self.callback
        getmany = self.getmany
        bulk_topic = self.bulk_topic
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                await self.sleep(0)  # Faust's loop does too: getmany may not yield
                if self.should_stop:
                    continue
                # Faust's getmany stops at a rebalance (generation or flow change) and yields
                # nothing after it without an await in between: what it gave is this generation's.
                fetched = [pair async for pair in getmany(timeout=1.0)]
                bulk: list[Message] = []
                others: list[Message] = []
                gaps: list[tuple[Any, int, int]] = []
                for tp, message in fetched:  # no await in here: no rebalance in between
                    offset = message.offset
                    read_offset = get_read_offset(tp)
                    if read_offset is not None and offset < read_offset:
                        continue  # fetched again after a seek: already handed over
                    if read_offset and offset - read_offset > 1 and acks_enabled_for(tp.topic):
                        gaps.append((tp, read_offset + 1, offset))
                    set_read_offset(tp, offset)
                    (bulk if tp.topic == bulk_topic else others).append(message)
                buffer.put_many(bulk)
                for tp, first, last in gaps:
                    await self._add_gap(tp, first, last)
                for message in others:
                    await self.wait_first(callback(message), self.suspend_flow.wait())
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
                if buffer.full:
                    await self.wait_first(buffer.wait_room(), self.suspend_flow.wait())
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, with the fetch wait of :attr:`BulkConsumer.fetch_max_wait_ms`."""

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher, which comes later.
        consumer._fetch_max_wait_ms = cast(BulkConsumer, self.consumer).fetch_max_wait_ms
        return consumer


class BulkTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport with :class:`BulkConsumer`."""

    Consumer: ClassVar[type[Any]] = BulkConsumer
