"""Reading the KPI snapshot from Redis at scrape time, counting only what changed.

A window's distinct count is a ``PFCOUNT`` over the union of its buckets' HyperLogLogs: with 1,000
campaigns, thousands of them per scrape, nearly all giving the same answer as the scrape before.
The reader keeps, per worker process, each count keyed by ``(campaign, window, kind)`` with the
bucket starts it covered and the campaign's *distinct-count version*, a counter that the
``PFADD`` script of :class:`~agents.redis_store.RedisStore` increments, in the same script (same
slot, atomically), whenever an add changed one of the campaign's HyperLogLogs. A count is
re-read when its version or its bucket set changed, or when it is older than ``max_age_s``.

Each scrape reads, in one pipeline, the store's identity marker and the versions of the
campaigns counted last time (one ``GET`` per campaign: keys of different campaigns may live in
different Redis Cluster slots, so no multi-key read). A version is always read *before* the
count it validates, so a count is never older than the version stored with it: an add that lands
in between makes the next scrape count again. A new identity marker (a flushed or replaced store)
drops every cached count.

``max_age_s`` bounds staleness where no version tracks a change: a worker of an older release
adding members without incrementing versions (during a rolling upgrade), or HyperLogLogs expiring
by TTL. Expiries are spread over ``[max_age_s / 2, max_age_s]`` so that re-counts do not all fall
on one scrape.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis

from stream.kpis import KpiSnapshot
from stream.partition import UNIQUE_MARK
from stream.windows import WINDOWS, window_bucket_starts

SEP = "\x1f"  # between the campaign and the name in the fields of the store's hashes

# (campaign, window label, kind)
DistinctKey = tuple[str, str, str]


class KeyNames(Protocol):
    """The store's key names (implemented by :class:`agents.redis_store.RedisStore`)."""

    def key(self, partition: int, name: str) -> str:
        """A key of one partition's state."""
        ...

    def unique_key(self, campaign: str, kind: str, bucket_ms: int, start_ms: int) -> str:
        """The HyperLogLog of one campaign's bucket."""
        ...

    def unique_version_key(self, campaign: str) -> str:
        """The campaign's distinct-count version."""
        ...

    def marker_key(self) -> str:
        """The store's identity marker."""
        ...


@dataclass(frozen=True, slots=True)
class _Count:
    """A cached distinct count and what it is valid for."""

    starts: tuple[int, ...]
    version: bytes | None
    count: int
    expires_at: float


class SnapshotReader:
    """Builds :class:`~stream.kpis.KpiSnapshot` from Redis, re-counting only what changed.

    Args:
        redis: An asyncio Redis client (``decode_responses=False``).
        partitions: How many partitions the events topic has.
        keys: The store's key names.
        max_age_s: Longest time a cached count is used without being counted again (0: never
            cached).
        clock: Monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        redis: Redis,
        partitions: int,
        keys: KeyNames,
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.partitions = partitions
        self.keys = keys
        self.max_age_s = max_age_s
        self.clock = clock
        self._random = random.Random()
        self._lock = asyncio.Lock()  # one read at a time: each reads and updates the caches
        self._marker: bytes | None = None
        self._counts: dict[DistinctKey, _Count] = {}

    async def read(self) -> KpiSnapshot:
        """Every KPI and pipeline total, over all partitions."""
        async with self._lock:
            return await self._read()

    async def _read(self) -> KpiSnapshot:
        now = self.clock()
        snap = KpiSnapshot()
        partitions = range(self.partitions)
        counted = sorted({campaign for campaign, _, _ in self._counts})
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.marker_key())
            for p in partitions:
                pipe.hgetall(self.keys.key(p, "meta"))
                pipe.hgetall(self.keys.key(p, "cnt"))
                pipe.hgetall(self.keys.key(p, "pipe"))
            for campaign in counted:
                pipe.get(self.keys.unique_version_key(campaign))
            replies = await pipe.execute()
        marker = replies[0]
        if marker != self._marker:  # another store, or a flushed one: nothing cached holds
            self._marker = marker
            self._counts.clear()
        versions = dict(zip(counted, replies[1 + 3 * self.partitions :], strict=True))
        for p in partitions:
            meta, counters, pipeline = replies[1 + 3 * p : 4 + 3 * p]
            if meta:
                snap.watermarks_ms[p] = int(meta[b"watermark_ms"])
                snap.offsets[p] = int(meta[b"offset"])
                snap.newest_event_ms = max(snap.newest_event_ms, int(meta[b"newest_event_ms"]))
                snap.open_visits += int(meta.get(b"open_visits", 0))
            for field, value in counters.items():
                campaign, name = field.decode().rsplit(SEP, 1)
                snap.add_counters(campaign, {name: int(value)})
            snap.pipeline.update({k.decode(): int(v) for k, v in pipeline.items()})
        if snap.newest_event_ms >= 0:
            marked = await self._read_windows(snap)
            await self._count(snap, marked, versions, now)
        else:
            self._counts.clear()
        return snap

    async def _read_windows(self, snap: KpiSnapshot) -> dict[DistinctKey, tuple[int, ...]]:
        """Sum the window buckets over all partitions; returns which distinct counts have data.

        The buckets' ``u:<kind>`` marks tell which distinct-count buckets exist, so that only
        those are counted.
        """
        plan: list[tuple[str, int]] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for spec in WINDOWS:
                for start in window_bucket_starts(snap.newest_event_ms, spec):
                    for p in range(self.partitions):
                        pipe.hgetall(self.keys.key(p, f"w:{spec.bucket_ms}:{start}"))
                        plan.append((spec.label, start))
            replies = await pipe.execute()
        for campaign in snap.counters:
            for spec in WINDOWS:
                snap.window(campaign, spec.label)
        marked: dict[DistinctKey, set[int]] = defaultdict(set)
        for (label, start), reply in zip(plan, replies, strict=True):
            for field, value in reply.items():
                campaign, name = field.decode().rsplit(SEP, 1)
                if name.startswith(UNIQUE_MARK):
                    marked[campaign, label, name[len(UNIQUE_MARK) :]].add(start)
                else:
                    snap.window(campaign, label).sums[name] += int(value)
        return {key: tuple(sorted(starts)) for key, starts in marked.items()}

    async def _count(
        self,
        snap: KpiSnapshot,
        marked: dict[DistinctKey, tuple[int, ...]],
        versions: dict[str, bytes | None],
        now: float,
    ) -> None:
        """Fill the windows' distinct counts: cached ones still valid, the others counted."""
        stale: dict[str, list[DistinctKey]] = defaultdict(list)  # campaign -> its keys to count
        for key, starts in marked.items():
            campaign = key[0]
            cached = self._counts.get(key)
            valid = (
                cached is not None
                and campaign in versions
                and cached.version == versions[campaign]
                and cached.starts == starts
                and now < cached.expires_at
            )
            if not valid:
                stale[campaign].append(key)
        bucket_ms = {spec.label: spec.bucket_ms for spec in WINDOWS}
        plan: list[tuple[str, DistinctKey | None]] = []  # (campaign, key) or (campaign, None)
        if stale:
            async with self.redis.pipeline(transaction=False) as pipe:
                for campaign, keys in stale.items():
                    if campaign not in versions:  # a campaign new to the cache: version first
                        pipe.get(self.keys.unique_version_key(campaign))
                        plan.append((campaign, None))
                    for key in keys:
                        _, label, kind = key
                        size = bucket_ms[label]
                        pipe.pfcount(
                            *(self.keys.unique_key(campaign, kind, size, s) for s in marked[key])
                        )
                        plan.append((campaign, key))
                replies = await pipe.execute()
            for (campaign, maybe_key), reply in zip(plan, replies, strict=True):
                if maybe_key is None:
                    versions[campaign] = reply
                    continue
                expires_at = now + self.max_age_s * (0.5 + 0.5 * self._random.random())
                self._counts[maybe_key] = _Count(
                    marked[maybe_key], versions[campaign], int(reply), expires_at
                )
        # Forget counts no window needs any more (their campaign or bucket left the windows).
        self._counts = {key: self._counts[key] for key in marked}
        for (campaign, label, kind), cached in self._counts.items():
            snap.window(campaign, label).uniques[kind] = cached.count
