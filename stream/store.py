"""The store behind the worker: one interface, an in-memory implementation for unit tests.

The Redis implementation (``agents.redis_store``) is the real one; integration tests use it, never
this one. Both follow the same rules:

- :meth:`Store.commit` applies a :class:`~stream.partition.Delta` atomically *with* the
  partition's applied offset, and only if the stored offset is still the one the worker loaded
  (a fence against a worker that lost the partition in a rebalance);
- distinct-count adds are idempotent and written before the commit, so a replay re-adds nothing;
- the store carries an identity marker, created once: a store that lost everything (a Redis
  restarted empty, a flush) has no marker or another one, so workers notice it instead of counting
  up from zero (see ``agents.processor``).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from stream.kpis import KpiSnapshot
from stream.partition import UNIQUE_MARK, Delta, VisitNeeds
from stream.visits import Visit, VisitKey
from stream.watermark import Watermark
from stream.windows import RETENTION_MS, WINDOWS, window_bucket_starts

UniqueAdds = Mapping[tuple[str, str, int, int], set[str]]


@dataclass(slots=True)
class PartitionSnapshot:
    """A partition's state as stored: applied offset, watermark, open visits.

    ``visits`` holds every open visit only where a store keeps them at hand (the in-memory one);
    workers fetch the ones a step needs with :meth:`Store.visits`. ``open_visits`` counts them.
    """

    offset: int = -1
    watermark: Watermark = field(default_factory=Watermark)
    visits: dict[VisitKey, list[Visit]] = field(default_factory=dict)
    open_visits: int = 0


class Store(Protocol):
    """The shared store of every worker."""

    async def load(self, partition: int) -> PartitionSnapshot:
        """The stored state of a partition (empty when never written)."""
        ...

    async def seen(self, partition: int, event_ids: Sequence[str]) -> set[str]:
        """Which of ``event_ids`` the partition has already counted."""
        ...

    def forget(self, partition: int) -> None:
        """Drop what this store holds in memory for a partition the worker no longer owns."""
        ...

    async def visits(self, partition: int, needs: VisitNeeds) -> dict[VisitKey, list[Visit]]:
        """The open visits of ``needs.keys``, and those whose last event is before
        ``needs.last_before_ms`` (for any key); those of ``needs.held`` may be left out."""
        ...

    async def add_uniques(self, uniques: UniqueAdds) -> None:
        """Add members to the window buckets' distinct counts (idempotent)."""
        ...

    async def commit(self, delta: Delta, expected_offset: int, dedup_retention_ms: int) -> bool:
        """Apply ``delta`` atomically if the stored offset is ``expected_offset``.

        Returns:
            ``False`` when the fence failed (the stored offset moved): nothing was written.
        """
        ...

    async def read(self) -> KpiSnapshot:
        """Every KPI and pipeline total, over all partitions.

        The snapshot is read-only: a store may return the same object again while nothing it
        holds changed (and users may reuse what they derived from it).
        """
        ...

    async def marker(self, create: bool) -> str | None:
        """The store's identity marker, ``None`` when it has none.

        Args:
            create: Create the marker first when missing (a new random id and the creation time;
                when several workers race, one marker wins and all of them read it).
        """
        ...


class MemoryStore:
    """A :class:`Store` in process memory, exact distinct counts. For unit tests only."""

    def __init__(self) -> None:
        self.partitions: dict[int, PartitionSnapshot] = {}
        self.counters: dict[int, Counter[tuple[str, str]]] = {}
        self.pipeline: dict[int, Counter[str]] = {}
        self.windows: dict[int, Counter[tuple[int, int, str, str]]] = {}
        self.seen_ids: dict[int, dict[str, int]] = {}
        self.uniques: dict[tuple[str, str, int, int], set[str]] = {}
        self.open_visits: dict[int, int] = {}
        self.identity: str | None = None

    async def load(self, partition: int) -> PartitionSnapshot:
        stored = self.partitions.get(partition, PartitionSnapshot())
        visits = {k: [copy.copy(v) for v in vs] for k, vs in stored.visits.items()}
        open_visits = self.open_visits.get(partition, 0)
        return PartitionSnapshot(stored.offset, replace(stored.watermark), visits, open_visits)

    async def visits(self, partition: int, needs: VisitNeeds) -> dict[VisitKey, list[Visit]]:
        stored = self.partitions.get(partition, PartitionSnapshot()).visits
        wanted = set(needs.keys)
        return {
            key: [copy.copy(v) for v in visits]
            for key, visits in stored.items()
            if key in wanted or min(v.last_ms for v in visits) < needs.last_before_ms
        }

    async def seen(self, partition: int, event_ids: Sequence[str]) -> set[str]:
        known = self.seen_ids.get(partition, {})
        return {i for i in event_ids if i in known}

    def forget(self, partition: int) -> None:
        """Nothing to drop: this store is the shared state itself."""

    async def add_uniques(self, uniques: UniqueAdds) -> None:
        for key, members in uniques.items():
            self.uniques.setdefault(key, set()).update(members)

    async def commit(self, delta: Delta, expected_offset: int, dedup_retention_ms: int) -> bool:
        p = delta.partition
        stored = self.partitions.setdefault(p, PartitionSnapshot())
        if stored.offset != expected_offset:
            return False
        stored.offset = delta.offset
        stored.watermark = replace(delta.watermark)
        for key, visits in delta.visits.items():
            if visits is None:
                stored.visits.pop(key, None)
            else:
                stored.visits[key] = [copy.copy(v) for v in visits]
        self.counters.setdefault(p, Counter()).update(delta.counters)
        self.pipeline.setdefault(p, Counter()).update(delta.pipeline)
        windows = self.windows.setdefault(p, Counter())
        for bucket, value in delta.windows.items():
            if bucket[3].startswith(UNIQUE_MARK):
                windows[bucket] = 1  # a mark, not a sum: idempotent
            else:
                windows[bucket] += value
        oldest = delta.watermark.newest_event_ms - RETENTION_MS
        for bucket in [b for b in windows if b[1] < oldest]:
            del windows[bucket]
        seen = self.seen_ids.setdefault(p, {})
        score = delta.watermark.watermark_ms
        seen.update(dict.fromkeys(delta.seen, score))
        horizon = score - dedup_retention_ms
        for event_id in [i for i, s in seen.items() if s < horizon]:
            del seen[event_id]
        self.open_visits[p] = delta.open_visits
        return True

    async def marker(self, create: bool) -> str | None:
        if create and self.identity is None:
            self.identity = f"memory-{id(self):x}"
        return self.identity

    async def read(self) -> KpiSnapshot:
        snap = KpiSnapshot()
        for p, counters in self.counters.items():
            for (campaign, name), value in counters.items():
                snap.add_counters(campaign, {name: value})
            snap.pipeline.update(self.pipeline.get(p, Counter()))
        for p, stored in self.partitions.items():
            snap.watermarks_ms[p] = stored.watermark.watermark_ms
            snap.offsets[p] = stored.offset
            snap.newest_event_ms = max(snap.newest_event_ms, stored.watermark.newest_event_ms)
        snap.open_visits = sum(self.open_visits.values())
        for spec in WINDOWS:
            starts = set(window_bucket_starts(snap.newest_event_ms, spec))
            for campaign in snap.counters:
                data = snap.window(campaign, spec.label)
                for windows in self.windows.values():
                    for (bucket_ms, start, c, name), value in windows.items():
                        in_window = bucket_ms == spec.bucket_ms and start in starts
                        if c == campaign and in_window and not name.startswith(UNIQUE_MARK):
                            data.sums[name] += value
                kinds: dict[str, set[str]] = {}
                for (c, kind, bucket_ms, start), members in self.uniques.items():
                    if c == campaign and bucket_ms == spec.bucket_ms and start in starts:
                        kinds.setdefault(kind, set()).update(members)
                data.uniques = {kind: len(members) for kind, members in kinds.items()}
        return snap
