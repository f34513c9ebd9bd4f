"""The worker's batch loop: records in, durable KPI changes out, exactly once in effect.

For each partition of a batch, under that partition's lock:

1. decode the records (pure, :mod:`stream.partition`) and ask the store which event ids it has
   already counted;
2. apply them to the partition's state, which gives a delta;
3. publish its dead letters and re-keyed events and wait for Kafka's acknowledgement;
4. add its distinct-count members (idempotent), then commit the delta atomically with the
   partition's offset, fenced on the offset the state was loaded at.

Only then does the agent ack the records. Any failure (Redis, Kafka, a lost fence) throws the
in-memory state away and retries the same records from the stored state: records already applied
are skipped by offset, so nothing counts twice and nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from agents.metrics import WorkerMetrics
from agents.settings import Settings
from stream.events import Reason, Rejection
from stream.partition import (
    DeadLetter,
    Decoded,
    Delta,
    Limits,
    PartitionState,
    Record,
    candidate_ids,
    decode,
)
from stream.store import Store

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 5.0


def limits_of(settings: Settings) -> Limits:
    """The contract's time rules from the settings."""
    return Limits(
        gap_ms=settings.session_gap_seconds * 1000,
        lateness_ms=settings.allowed_lateness_seconds * 1000,
        max_future_ms=settings.max_future_seconds * 1000,
        idle_advance_s=settings.idle_advance_seconds,
    )


class Publisher(Protocol):
    """What the processor needs from Kafka (see :class:`agents.kafka.Publisher`)."""

    async def publish(self, delta: Delta) -> None:
        """Send the delta's dead letters and re-keyed events; return once Kafka has them."""
        ...


class BatchProcessor:
    """Applies batches of records to the store, one partition at a time.

    Args:
        store: The shared store.
        publisher: Sends dead letters and re-keyed events.
        settings: The worker's settings.
        partitions: Partitions of the events topic.
        metrics: The worker's metrics.
        clock: Wall clock, epoch seconds (a parameter for tests).
    """

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        settings: Settings,
        partitions: int,
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.partitions = partitions
        self.metrics = metrics
        self.clock = clock
        self.limits = limits_of(settings)
        self.identity_key = settings.identity_key_bytes()
        self.dedup_retention_ms = settings.dedup_retention_seconds * 1000
        self.states: dict[int, PartitionState] = {}
        self.assigned: set[int] = set()
        self._locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def handle(self, records: Sequence[Record]) -> None:
        """Make a batch's effects durable; returns only once they are (or raises on cancel)."""
        by_partition: defaultdict[int, list[Record]] = defaultdict(list)
        for record in records:
            by_partition[record.partition].append(record)
        for partition, part in by_partition.items():
            part.sort(key=lambda r: r.offset)
            self.metrics.batch_records.observe(len(part))
            decoded = decode(part)
            async with self._locks[partition]:
                await self._until_durable(partition, self._applier(decoded), decoded)

    def _applier(
        self, decoded: Sequence[Decoded]
    ) -> Callable[[PartitionState, set[str]], Delta | None]:
        return lambda state, seen: state.apply(decoded, seen, self.clock())

    async def advance_idle(self) -> None:
        """Let quiet assigned partitions' watermarks follow the clock, closing their visits."""
        for partition in sorted(self.assigned):
            async with self._locks[partition]:
                await self._until_durable(
                    partition, lambda s, _seen: s.idle_advance(self.clock()), ()
                )

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop the state of partitions this worker no longer owns."""
        for partition in partitions:
            self.states.pop(partition, None)
            self.assigned.discard(partition)

    async def _state(self, partition: int) -> PartitionState:
        state = self.states.get(partition)
        if state is None:
            stored = await self.store.load(partition)
            state = PartitionState(
                partition,
                self.partitions,
                self.limits,
                self.identity_key,
                offset=stored.offset,
                watermark=stored.watermark,
            )
            state.watermark.arrived(self.clock())
            for key, visits in stored.visits.items():
                state.visits.load(key, visits)
            self.states[partition] = state
        return state

    async def _until_durable(
        self,
        partition: int,
        step: Callable[[PartitionState, set[str]], Delta | None],
        decoded: Sequence[Decoded],
    ) -> None:
        ids = candidate_ids(decoded)
        backoff_s = 0.1
        while True:
            started = time.perf_counter()
            try:
                state = await self._state(partition)
                expected = state.offset
                seen = await self.store.seen(partition, ids) if ids else set()
                try:
                    delta = step(state, seen)
                except Exception:
                    log.exception("partition %d: processing failed; dead-lettering", partition)
                    self.states.pop(partition, None)
                    delta = _dead_letter_all(partition, decoded, await self._state(partition))
                if delta is None:
                    return
                await self.publisher.publish(delta)
                await self.store.add_uniques(delta.uniques)
                if await self.store.commit(delta, expected, self.dedup_retention_ms):
                    self.metrics.flush_seconds.observe(time.perf_counter() - started)
                    return
                self.metrics.fence_lost.inc()
                log.warning("partition %d: applied elsewhere meanwhile; reloading", partition)
                self.states.pop(partition, None)
            except asyncio.CancelledError:
                self.states.pop(partition, None)
                raise
            except Exception as exc:  # store or broker unavailable: wait, reload, retry
                self.states.pop(partition, None)
                self.metrics.store_retries.inc()
                log.warning("partition %d: %s; retrying in %.1f s", partition, exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)


def _dead_letter_all(partition: int, decoded: Sequence[Decoded], state: PartitionState) -> Delta:
    """A delta that rejects every not-yet-applied record whole (the processing bug path)."""
    delta = Delta(partition, state.offset, state.watermark)
    for d in decoded:
        if d.record.offset <= state.offset:
            continue
        message = "the worker failed to process this record"
        rejection = Rejection(Reason.PROCESSING_ERROR, message, d.record.value or b"")
        delta.dead_letters.append(DeadLetter(d.record, rejection))
        delta.pipeline[f"rejected:{Reason.PROCESSING_ERROR.value}"] += 1
        delta.offset = state.offset = d.record.offset
    delta.open_visits = len(state.visits)
    return delta
