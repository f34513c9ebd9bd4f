"""Reading the KPI snapshot from Redis at scrape time, re-reading only what changed.

With 1,000 campaigns a scrape covers ~90,000 hash fields (counters and window buckets of every
partition) and thousands of window distinct counts (a ``PFCOUNT`` over the union of a window's
bucket HyperLogLogs), nearly all unchanged since the scrape before. The reader keeps, per worker
process:

- **each partition's hashes** (counters, pipeline totals, window buckets), valid while the
  partition's ``meta`` hash is unchanged: every commit rewrites ``meta`` in its script and
  increments its ``rev`` field there, so an unchanged ``meta`` is an unchanged partition. The
  commit also names there the hashes it changed (``touched``, with the ``rev`` it left), so
  that a reader one commit behind re-reads only those (see :func:`touched`): a live campaign
  commits every partition several times a second, and a scrape read all of a partition's
  ~45 window buckets again for each;
- **each distinct count**, keyed by ``(campaign, window, kind)`` with the starts of the buckets
  it covered (those holding data) and the campaign's *distinct-count version*: a counter that
  the ``PFADD`` script of :class:`~agents.redis_store.RedisStore` increments, in the same script
  (same slot, atomically), whenever an add changed one of the campaign's HyperLogLogs;
- **the snapshot**, returned again (the same object) while none of the above changed, so that
  the page can reuse what it rendered from it.

A scrape is one pipeline when nothing changed: the store's identity marker, every partition's
``meta`` and the versions of the campaigns counted (one ``GET`` per campaign: keys of different
campaigns may live in different Redis Cluster slots, so no multi-key read). A second pipeline
reads the changed partitions' hashes (and the buckets a moved window newly covers); a third
counts the stale distinct counts, one script call per campaign returning its version with its
counts (atomically: one slot). A ``meta`` is read *before* the hashes it validates, so cached
hashes are never older than the ``meta`` stored with them: a commit landing in between only makes
the next scrape read them again. A new identity marker (a flushed or replaced store) drops
everything.

``max_age_s`` bounds staleness where no token tracks a change: a worker of an older release
writing without incrementing versions (during a rolling upgrade), or HyperLogLogs expiring by
TTL. Distinct counts expire spread over ``[max_age_s / 2, max_age_s]`` so that re-counts do not
all fall on one scrape.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis

from stream.kpis import KpiSnapshot, WindowData
from stream.partition import UNIQUE_MARK
from stream.windows import WINDOWS, window_bucket_starts

SEP = "\x1f"  # between the campaign and the name in the fields of the store's hashes

DistinctKey = tuple[str, str, str]
"""``(campaign, window label, kind)``"""

Bucket = tuple[int, int]
"""``(bucket_ms, start_ms)``"""


# One campaign's stale counts with its version, read together (atomically: a script).
# KEYS: the version, then the HyperLogLogs of each count in turn; ARGV: how many each count has.
_COUNT_LUA = """
local out = {redis.call('GET', KEYS[1]) or false}
local first = 2
for i = 1, #ARGV do
  local last = first + tonumber(ARGV[i]) - 1
  out[#out + 1] = redis.call('PFCOUNT', unpack(KEYS, first, last))
  first = last + 1
end
return out
"""


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


class _Fields(dict[bytes, tuple[str, str, bool]]):
    """Hash fields ``C\\x1f<name>`` split once: ``(campaign, name, whether a distinct mark)``.

    Holds every field seen: about as many as the store's counters hash has (campaigns never
    leave it), times the few window names.
    """

    def __missing__(self, raw: bytes) -> tuple[str, str, bool]:
        campaign, _, name = raw.decode().rpartition(SEP)
        parsed = self[raw] = (campaign, name, name.startswith(UNIQUE_MARK))
        return parsed


Hash = dict[bytes, bytes]
"""A hash as read: ``field -> value``."""


def touched(before: Hash, after: Hash) -> list[bytes] | None:
    """The names of the hashes of sums (``cnt``, ``pipe``, ``w:<bucket_ms>:<start_ms>``) that
    changed between two reads of a partition's ``meta``, when one commit made the difference:
    its script names them in ``touched``, with the commit count it left (``rev``). ``None`` when
    not known: several commits, or one that did not name them (a worker of an older release
    leaves ``touched`` behind with an older ``rev``)."""
    names, rev = after.get(b"touched"), before.get(b"rev")
    if names is None or rev is None:
        return None
    after_rev, *changed = names.split()
    if after_rev != after.get(b"rev") or int(after_rev) != int(rev) + 1:
        return None
    return changed


def _in_windows(held: dict[Bucket, Hash], buckets: list[Bucket]) -> dict[Bucket, Hash]:
    """The buckets of ``held`` still among the windows' ``buckets``."""
    return {b: held[b] for b in buckets if b in held}


@dataclass(slots=True)
class _Partition:
    """One partition's hashes as read (raw: parsed when added up), valid while its ``meta`` is
    the same."""

    meta: Hash
    read_at: float
    counters: Hash = field(default_factory=dict)
    pipeline: Hash = field(default_factory=dict)
    buckets: dict[Bucket, Hash] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Count:
    """A distinct count and what it is valid for."""

    starts: tuple[int, ...]
    version: bytes | None
    count: int
    expires_at: float


@dataclass(slots=True)
class _Sums:
    """Everything of a snapshot but the distinct counts: rebuilt when a partition changed."""

    snapshot: KpiSnapshot  # its windows hold the sums, no distinct count
    marked: dict[DistinctKey, tuple[int, ...]]  # which bucket HyperLogLogs hold data


class SnapshotReader:
    """Builds :class:`~stream.kpis.KpiSnapshot` from Redis, re-reading only what changed.

    Args:
        redis: An asyncio Redis client (``decode_responses=False``).
        partitions: How many partitions the events topic has.
        keys: The store's key names.
        max_age_s: Longest time cached data is used without being read again (0: never).
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
        self._count_script = redis.register_script(_COUNT_LUA)
        self._random = random.Random()
        self._lock = asyncio.Lock()  # one read at a time: each reads and updates the caches
        self._fields = _Fields()
        self._marker: bytes | None = None
        self._parts: dict[int, _Partition] = {}
        self._buckets: list[Bucket] = []  # the windows' buckets as of the last read
        self._counts: dict[DistinctKey, _Count] = {}
        self._sums: _Sums | None = None
        self._snapshot: KpiSnapshot | None = None

    async def read(self) -> KpiSnapshot:
        """Every KPI and pipeline total, over all partitions.

        The snapshot is shared: the same object is returned again while nothing changed.
        """
        async with self._lock:
            return await self._read()

    async def _read(self) -> KpiSnapshot:
        now = self.clock()
        counted = sorted({campaign for campaign, _, _ in self._counts})
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.marker_key())
            for p in range(self.partitions):
                pipe.hgetall(self.keys.key(p, "meta"))
            for campaign in counted:
                pipe.get(self.keys.unique_version_key(campaign))
            replies = await pipe.execute()
        marker, metas = replies[0], replies[1 : 1 + self.partitions]
        versions = dict(zip(counted, replies[1 + self.partitions :], strict=True))
        if marker != self._marker:  # another store, or a flushed one: nothing cached holds
            self._marker = marker
            self._parts.clear()
            self._counts.clear()
            self._sums = self._snapshot = None
        newest_ms = max((int(m[b"newest_event_ms"]) for m in metas if m), default=-1)
        buckets = (
            [(spec.bucket_ms, s) for spec in WINDOWS for s in window_bucket_starts(newest_ms, spec)]
            if newest_ms >= 0
            else []
        )
        if await self._read_partitions(metas, buckets, now) or self._sums is None:
            self._sums = self._add_up(newest_ms)
            self._snapshot = None  # until the counts of these sums are read
        if await self._count(self._sums.marked, versions, now) or self._snapshot is None:
            self._snapshot = self._with_counts(self._sums.snapshot)
        return self._snapshot

    async def _read_partitions(
        self, metas: list[dict[bytes, bytes]], buckets: list[Bucket], now: float
    ) -> bool:
        """Read the hashes of the partitions whose ``meta`` changed (those the one commit since
        changed, if known: see :func:`touched`), and the window buckets not read yet; returns
        whether anything was read."""
        plan: list[tuple[_Partition, str | Bucket]] = []
        fresh: dict[int, _Partition] = {}  # cached once read: a failed read leaves no hole
        moved = buckets != self._buckets  # else every cached partition holds every bucket
        async with self.redis.pipeline(transaction=False) as pipe:

            def read(p: int, part: _Partition, what: str | Bucket) -> None:
                name = what if isinstance(what, str) else f"w:{what[0]}:{what[1]}"
                pipe.hgetall(self.keys.key(p, name))
                plan.append((part, what))

            for p, meta in enumerate(metas):
                cached = self._parts.get(p)
                if cached is not None and now >= cached.read_at + self.max_age_s:
                    cached = None  # too old: read whole again
                if cached is not None and cached.meta == meta:  # unchanged
                    if not moved:
                        continue  # it holds every bucket of the windows already
                    cached.buckets = _in_windows(cached.buckets, buckets)
                    part = cached
                else:
                    changed = None if cached is None else touched(cached.meta, meta)
                    if cached is None or changed is None:  # read whole
                        part = fresh[p] = _Partition(meta, now)
                        changed = [b"cnt", b"pipe"]
                    else:  # one commit since: read again what it changed
                        kept = _in_windows(cached.buckets, buckets)
                        part = fresh[p] = _Partition(
                            meta, cached.read_at, cached.counters, cached.pipeline, kept
                        )
                    for raw in changed:
                        if raw in (b"cnt", b"pipe"):
                            read(p, part, raw.decode())
                        else:  # read again below, if still in a window
                            _, bucket_ms, start_ms = raw.split(b":")
                            part.buckets.pop((int(bucket_ms), int(start_ms)), None)
                for bucket in buckets:
                    if bucket not in part.buckets:
                        read(p, part, bucket)
            replies = await pipe.execute() if plan else []
        self._buckets = buckets
        for (part, what), reply in zip(plan, replies, strict=True):
            if what == "cnt":
                part.counters = reply
            elif what == "pipe":
                part.pipeline = reply
            elif isinstance(what, tuple):
                part.buckets[what] = reply
        self._parts.update(fresh)
        return bool(plan or fresh)  # a new meta alone changes offsets and watermarks

    def _add_up(self, newest_ms: int) -> _Sums:
        """Every partition's counters, pipeline totals and window sums, added up.

        Values are added per raw field first, and each field's ``campaign`` and name looked up
        once per total: a field is in several partitions and buckets.
        """
        fields = self._fields
        parts = [part for _, part in sorted(self._parts.items())]
        snap = KpiSnapshot(newest_event_ms=newest_ms)
        totals: dict[bytes, int] = {}
        for p, part in sorted(self._parts.items()):
            meta = part.meta
            if meta:
                snap.watermarks_ms[p] = int(meta[b"watermark_ms"])
                snap.offsets[p] = int(meta[b"offset"])
                snap.open_visits += int(meta.get(b"open_visits", 0))
            for raw, value in part.counters.items():
                totals[raw] = totals.get(raw, 0) + int(value)
            snap.pipeline.update({raw.decode(): int(value) for raw, value in part.pipeline.items()})
        counters = snap.counters
        for raw, total in totals.items():
            campaign, name, _ = fields[raw]
            values = counters.get(campaign)
            if values is None:
                values = counters[campaign] = Counter()
            values[name] = total
        marked: dict[DistinctKey, tuple[int, ...]] = {}
        if newest_ms < 0:
            return _Sums(snap, marked)
        for campaign in counters:
            for spec in WINDOWS:
                snap.window(campaign, spec.label)
        for spec in WINDOWS:
            label = spec.label
            sums: dict[bytes, int] = {}
            marks: dict[bytes, set[int]] = {}  # mark field -> starts of the buckets holding it
            for start in window_bucket_starts(newest_ms, spec):
                for part in parts:
                    for raw, value in part.buckets.get((spec.bucket_ms, start), {}).items():
                        if not fields[raw][2]:
                            sums[raw] = sums.get(raw, 0) + int(value)
                        elif raw in marks:
                            marks[raw].add(start)
                        else:
                            marks[raw] = {start}
            for raw, total in sums.items():
                campaign, name, _ = fields[raw]
                snap.window(campaign, label).sums[name] = total
            for raw, starts in marks.items():
                campaign, name, _ = fields[raw]
                snap.window(campaign, label)
                marked[campaign, label, name[len(UNIQUE_MARK) :]] = tuple(sorted(starts))
        return _Sums(snap, marked)

    async def _count(
        self,
        marked: dict[DistinctKey, tuple[int, ...]],
        versions: dict[str, bytes | None],
        now: float,
    ) -> bool:
        """Count the distinct counts not validly cached; returns whether any count changed."""
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
        changed = len(marked) != len(self._counts) or not all(k in self._counts for k in marked)
        if stale:
            bucket_ms = {spec.label: spec.bucket_ms for spec in WINDOWS}
            async with self.redis.pipeline(transaction=False) as pipe:
                for campaign, keys in stale.items():  # one script call per campaign (one slot)
                    hlls = [
                        self.keys.unique_key(campaign, kind, bucket_ms[label], start)
                        for _, label, kind in keys
                        for start in marked[campaign, label, kind]
                    ]
                    await self._count_script(
                        keys=[self.keys.unique_version_key(campaign), *hlls],
                        args=[len(marked[key]) for key in keys],
                        client=pipe,
                    )
                replies = await pipe.execute()
            for keys, (version, *counts) in zip(stale.values(), replies, strict=True):
                for key, count in zip(keys, counts, strict=True):
                    old = self._counts.get(key)
                    changed = changed or old is None or old.count != count
                    expires_at = now + self.max_age_s * (0.5 + 0.5 * self._random.random())
                    self._counts[key] = _Count(marked[key], version, count, expires_at)
        # Forget counts no window needs any more (their campaign or bucket left the windows).
        self._counts = {key: self._counts[key] for key in marked}
        return changed

    def _with_counts(self, sums: KpiSnapshot) -> KpiSnapshot:
        """A snapshot of ``sums`` (shared, not copied) with the cached distinct counts."""
        windows = {key: WindowData(data.sums) for key, data in sums.windows.items()}
        for (campaign, label, kind), cached in self._counts.items():
            windows[campaign, label].uniques[kind] = cached.count
        return KpiSnapshot(
            counters=sums.counters,
            pipeline=sums.pipeline,
            windows=windows,
            watermarks_ms=sums.watermarks_ms,
            offsets=sums.offsets,
            newest_event_ms=sums.newest_event_ms,
            open_visits=sums.open_visits,
        )
