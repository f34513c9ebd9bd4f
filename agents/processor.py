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
are skipped by offset, so nothing counts twice and nothing is lost. An outage of Redis or Kafka is
such a failure: the batch waits (backoff up to 5 s), unacknowledged, and resumes by itself.

A store that *lost* state is different: retrying would count up from zero. Each time a partition's
state is loaded, the store is checked first (:class:`StoreResetError`):

- its identity marker must be the one this worker first saw (a Redis restarted empty or flushed has
  none, or a new one);
- its applied offset must not be behind what the consumer group has committed: the group commits
  only acknowledged records, and records are acknowledged only once durable, so committed offset
  ``> applied + 1`` means acknowledged effects are gone.

When either fails the worker logs an ERROR, sets ``kpi_store_reset_detected`` to 1 and stops
applying (nothing acked, lag grows), rechecking every few seconds: restoring the store (same marker,
offsets back) lets it resume by itself; otherwise an operator rebuilds the KPIs by replaying the
topic into a new key prefix with a new consumer group (docs/reliability.md).
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
    decode,
)
from stream.store import Store

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 5.0
_RESET_RECHECK_S = 5.0


class StoreResetError(Exception):
    """The store lost state the consumer group had already acknowledged: do not apply on it.

    Args:
        what: What was found reset: ``"store"`` (the marker) or ``"partition <n>"``.
        why: The explanation, for the log.
    """

    def __init__(self, what: str, why: str) -> None:
        super().__init__(why)
        self.what = what
        self.why = why


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
        committed: The consumer group's committed offset of a partition (the next offset to
            read), ``None`` when none; checked against the store's applied offset.
    """

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        settings: Settings,
        partitions: int,
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.time,
        committed: Callable[[int], int | None] = lambda _partition: None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.partitions = partitions
        self.metrics = metrics
        self.clock = clock
        self.committed = committed
        self.store_id: str | None = None  # the store's identity marker as first seen
        self.resets: dict[str, str] = {}  # what is found reset (the marker, a partition) -> why
        self.limits = limits_of(settings)
        self.identity_key = settings.identity_key_bytes()
        self.dedup_retention_ms = settings.dedup_retention_seconds * 1000
        self.visit_cache = settings.visit_cache
        self.states: dict[int, PartitionState] = {}
        self.assigned: set[int] = set()
        self._locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def handle(self, records: Sequence[Record]) -> None:
        """Make a batch's effects durable; returns only once they are (or raises on cancel)."""
        by_partition: defaultdict[int, list[Record]] = defaultdict(list)
        for record in records:
            by_partition[record.partition].append(record)
        # Partitions are independent: overlap one's store round trips with another's work.
        await asyncio.gather(*(self._handle_partition(p, part) for p, part in by_partition.items()))

    async def _handle_partition(self, partition: int, records: list[Record]) -> None:
        records.sort(key=lambda r: r.offset)
        self.metrics.batch_records.observe(len(records))
        decoded = decode(records)
        async with self._locks[partition]:
            await self._until_durable(partition, decoded)

    async def advance_idle(self) -> None:
        """Let quiet assigned partitions' watermarks follow the clock, closing their visits."""
        for partition in sorted(self.assigned):
            async with self._locks[partition]:
                await self._until_durable(partition, None)

    async def check_store(self) -> None:
        """Check the store's identity marker now (the timer calls this: detection when idle)."""
        try:
            await self._check_marker()
        except StoreResetError as exc:
            self._report_reset(exc)
        except Exception:  # the store is down: the batch loop reports and retries that
            return

    async def _check_marker(self) -> None:
        marker = await self.store.marker(create=self.store_id is None)
        if self.store_id is None:
            self.store_id = marker
        elif marker != self.store_id:
            state = "is gone" if marker is None else f"is now {marker}"
            raise StoreResetError(
                "store",
                f"the store's identity marker {self.store_id} {state}: the store restarted "
                "empty or was flushed",
            )
        self._clear_reset("store")

    def _verify(self, partition: int, applied_offset: int) -> None:
        committed = self.committed(partition)
        if committed is not None and committed > applied_offset + 1:
            raise StoreResetError(
                f"partition {partition}",
                f"partition {partition}: the consumer group committed offset {committed} but the "
                f"store has applied only up to {applied_offset}: acknowledged effects are missing",
            )
        self._clear_reset(f"partition {partition}")

    def _report_reset(self, exc: StoreResetError) -> None:
        if self.resets.get(exc.what) != exc.why:
            log.error(
                "STORE RESET DETECTED: %s; not applying anything (nothing is acknowledged) until "
                "the store is restored, or the KPIs are rebuilt by a replay "
                "(docs/reliability.md)",
                exc.why,
            )
        self.resets[exc.what] = exc.why
        self.metrics.store_reset.set(1)

    def _clear_reset(self, what: str) -> None:
        if self.resets.pop(what, None) is not None:
            log.warning("store check passed again for %s", what)
            if not self.resets:
                self.metrics.store_reset.set(0)

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop the state of partitions this worker no longer owns."""
        for partition in partitions:
            self.states.pop(partition, None)
            self.assigned.discard(partition)
            self.store.forget(partition)

    async def _state(self, partition: int) -> PartitionState:
        state = self.states.get(partition)
        if state is None:
            await self._check_marker()
            stored = await self.store.load(partition)
            self._verify(partition, stored.offset)
            state = PartitionState(
                partition,
                self.partitions,
                self.limits,
                self.identity_key,
                offset=stored.offset,
                watermark=stored.watermark,
                open_visits=stored.open_visits,
            )
            state.watermark.arrived(self.clock())
            self.states[partition] = state
        return state

    async def _until_durable(self, partition: int, decoded: Sequence[Decoded] | None) -> None:
        """Apply ``decoded`` (or, for ``None``, an idle advance) until it is durable."""
        backoff_s = 0.1
        while True:
            started = time.perf_counter()
            try:
                state = await self._state(partition)
                expected = state.offset
                now = self.clock()
                needs = (
                    state.idle_needs(now) if decoded is None else state.visit_needs(decoded, now)
                )
                if needs is None:
                    return  # idle, and the watermark would not move
                # Only the open visits this step touches or may close come into memory.
                seen, visits = await asyncio.gather(
                    self.store.seen(partition, needs.ids), self.store.visits(partition, needs)
                )
                state.load_visits(visits, needs)
                try:
                    if decoded is None:
                        delta = state.idle_advance(now)
                    else:
                        delta = state.apply(decoded, seen, now, needs)
                except Exception:
                    log.exception("partition %d: processing failed; dead-lettering", partition)
                    self.states.pop(partition, None)
                    delta = _dead_letter_all(partition, decoded or (), await self._state(partition))
                if delta is None:
                    return
                await self.publisher.publish(delta)
                await self.store.add_uniques(delta.uniques)
                if await self.store.commit(delta, expected, self.dedup_retention_ms):
                    # They are in the store; the recently active ones stay, bounded.
                    state.evict_visits(self.visit_cache, delta.visits)
                    self.metrics.flush_seconds.observe(time.perf_counter() - started)
                    return
                self.metrics.fence_lost.inc()
                log.warning("partition %d: applied elsewhere meanwhile; reloading", partition)
                self.states.pop(partition, None)
            except asyncio.CancelledError:
                self.states.pop(partition, None)
                raise
            except StoreResetError as exc:  # never count up from zero: hold, recheck
                self.states.pop(partition, None)
                self._report_reset(exc)
                await asyncio.sleep(_RESET_RECHECK_S)
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
    delta.open_visits = state.open_visits
    return delta
