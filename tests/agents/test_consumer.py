"""The consuming path's own parts: the record buffer, and batches in flight together.

The whole path (Faust's group, fetches, acks, rebalances) is covered against a real broker by
tests/integration and tests/chaos (test_rebalance caught a lost-records bug of this path).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import pytest
from faust.types import TP, Message
from prometheus_client import CollectorRegistry

from agents.consumer import RecordBuffer
from agents.metrics import WorkerMetrics
from agents.processor import BatchProcessor
from agents.settings import Settings
from stream.partition import Delta, Record, VisitNeeds
from stream.store import MemoryStore
from stream.visits import Visit, VisitKey
from tests.stream.factories import H_MS, event, record


def message(partition: int, offset: int, size: int = 10) -> Message:
    return Message(
        "events", partition, offset, 0.0, 0, [], None, b"x" * size, None, tp=TP("events", partition)
    )


async def test_take_returns_what_is_there_up_to_the_bounds() -> None:
    buffer = RecordBuffer(max_records=100, max_bytes=10_000)
    buffer.put_many([message(0, i) for i in range(5)])
    batch = await buffer.take(max_records=3, max_bytes=1_000_000, within_s=0)
    assert [m.offset for m in batch] == [0, 1, 2]
    batch = await buffer.take(max_records=10, max_bytes=15, within_s=0)
    assert [m.offset for m in batch] == [3, 4]  # the second reaches the byte bound: stop there
    assert len(buffer) == 0


async def test_take_waits_for_the_first_record_then_for_more_within_the_delay() -> None:
    buffer = RecordBuffer(max_records=100, max_bytes=10_000)

    async def later() -> None:
        await asyncio.sleep(0.01)
        buffer.put_many([message(0, 0)])
        await asyncio.sleep(0.01)
        buffer.put_many([message(0, 1)])

    producer = asyncio.create_task(later())
    batch = await buffer.take(max_records=10, max_bytes=10_000, within_s=5)
    await producer
    # Waits until the batch is full or the delay is over: here the second put comes in time.
    assert [m.offset for m in batch] in ([0, 1], [0])


async def test_a_full_buffer_makes_the_consumer_wait_until_taken() -> None:
    buffer = RecordBuffer(max_records=4, max_bytes=10_000)
    buffer.put_many([message(0, i) for i in range(4)])
    assert buffer.full
    waiter = asyncio.create_task(buffer.wait_room())
    await asyncio.sleep(0)
    assert not waiter.done()
    await buffer.take(max_records=2, max_bytes=10_000, within_s=0)
    await asyncio.wait_for(waiter, 1)


async def test_drop_forgets_the_given_partitions_or_all() -> None:
    buffer = RecordBuffer(max_records=100, max_bytes=10_000)
    buffer.put_many([message(p, i) for i in range(3) for p in range(3)])
    assert buffer.drop({1}) == 3
    batch = await buffer.take(max_records=100, max_bytes=10_000, within_s=0)
    assert {m.partition for m in batch} == {0, 2}
    buffer.put_many([message(0, 9)])
    assert buffer.drop() == 1
    assert len(buffer) == 0 and not buffer.full


class SlowStore(MemoryStore):
    """The memory store, with a random delay in each call: concurrent batches interleave."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)

    async def pause(self) -> None:
        await asyncio.sleep(self.rng.uniform(0, 0.003))

    async def seen(self, partition: int, event_ids: Sequence[str]) -> set[str]:
        await self.pause()
        return await super().seen(partition, event_ids)

    async def visits(self, partition: int, needs: VisitNeeds) -> dict[VisitKey, list[Visit]]:
        await self.pause()
        return await super().visits(partition, needs)

    async def commit(self, delta: Delta, expected_offset: int, dedup_retention_ms: int) -> bool:
        await self.pause()
        return await super().commit(delta, expected_offset, dedup_retention_ms)


class NoPublish:
    """Nothing here is dead-lettered or forwarded (one partition, valid events)."""

    async def publish(self, delta: Delta) -> None:
        assert not delta.dead_letters and not delta.forwards


def batches(seed: int) -> list[list[Record]]:
    rng = random.Random(seed)
    records = []
    for offset in range(120):
        ts = H_MS + offset * 20_000 + rng.randint(-60_000, 0)  # out of order, within lateness
        visitor = f"v{rng.randint(0, 9)}"
        kind = rng.choice(["page_view", "interaction", "participation"])
        records.append(record(offset, event(f"e{offset}", kind, ts, visitor_id=visitor)))
    cuts = sorted(rng.sample(range(1, 120), 11))
    return [records[a:b] for a, b in zip([0, *cuts], [*cuts, 120], strict=True)]


async def run(seed: int, concurrent: bool, visit_cache: int) -> Any:
    store = SlowStore(seed)
    settings = Settings(identity_key="k", session_gap_seconds=300, visit_cache=visit_cache)
    processor = BatchProcessor(
        store, NoPublish(), settings, 1, WorkerMetrics(CollectorRegistry()), clock=lambda: 2e9
    )
    if concurrent:  # as the consuming task does: the next batch starts before this one is durable
        await asyncio.gather(*(processor.handle(b) for b in batches(seed)))
    else:
        for b in batches(seed):
            await processor.handle(b)
    return await store.read(), store.partitions[0].offset


@pytest.mark.parametrize("visit_cache", [0, 10_000])  # visits fetched each step, or held over
@pytest.mark.parametrize("seed", range(5))
async def test_batches_in_flight_together_give_the_sequential_result(
    seed: int, visit_cache: int
) -> None:
    sequential = await run(seed, concurrent=False, visit_cache=visit_cache)
    concurrent = await run(seed, concurrent=True, visit_cache=visit_cache)
    assert concurrent == sequential
    assert sequential[1] == 119
