"""Tests of :mod:`agents.redis_read`: what a scrape reads again, against a real Redis.

``PFCOUNT`` calls are counted with Redis's own ``INFO commandstats``; time is a test clock.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from agents.embedded import EmbeddedRedis
from agents.redis_store import RedisStore
from stream.kpis import KpiSnapshot
from stream.partition import (
    UNIQUE_VISITORS,
    Delta,
    Limits,
    PartitionState,
    Record,
    decode,
)
from stream.partitioner import partition_for
from stream.store import MemoryStore, Store
from stream.watermark import Watermark
from stream.windows import RETENTION_MS, WINDOWS
from tests.stream.factories import DEDUP_RETENTION_MS, H_MS, KEY, MIN_MS, event, record
from tests.stream.factories import scenario_batches as scenario

pytestmark = pytest.mark.integration

MAX_AGE_S = 300.0
NOW_S = H_MS / 1000 + 7200  # the wall clock: every event of these tests is in the past


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def store(redis: Redis, clock: Clock) -> RedisStore:
    return RedisStore(
        redis, 1, f"t{uuid.uuid4().hex[:8]}", read_cache_max_age_s=MAX_AGE_S, clock=clock
    )


async def apply(store: Store, batch: Sequence[Record], partitions: int = 1) -> None:
    """One worker step on the batch's partition: what ``agents.processor`` does around the
    domain."""
    p = batch[0].partition
    snap = await store.load(p)
    state = PartitionState(
        p, partitions, Limits(), KEY, snap.offset, snap.watermark, snap.open_visits
    )
    decoded = decode(batch)
    needs = state.visit_needs(decoded, NOW_S)
    state.load_visits(await store.visits(p, needs), needs)
    seen = await store.seen(p, needs.ids)
    expected = state.offset
    delta = state.apply(decoded, seen, NOW_S, needs)
    await store.add_uniques(delta.uniques)
    assert await store.commit(delta, expected, DEDUP_RETENTION_MS)


def page_views(offset: int, *views: tuple[str, str, int], partition: int = 0) -> list[Record]:
    """Records of page views ``(campaign, visitor, ts_ms)``, from ``offset`` on."""
    return [
        record(
            offset + i,
            event(f"e{partition}-{offset + i}", "page_view", ts, campaign_id=c, visitor_id=v),
            partition=partition,
        )
        for i, (c, v, ts) in enumerate(views)
    ]


def visitors_of(partition: int, partitions: int, count: int) -> list[str]:
    """Visitor ids whose home is ``partition``."""
    found = (f"v{i}" for i in range(10_000))
    return [v for v in found if partition_for(v, partitions) == partition][:count]


def uniques(snap: KpiSnapshot, campaign: str, window: str) -> int:
    return snap.windows[campaign, window].uniques.get(UNIQUE_VISITORS, 0)


async def calls(redis: Redis, command: str) -> int:
    """How many ``command`` the server has run (scripts' calls included)."""
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def pfcount_calls(redis: Redis) -> int:
    return await calls(redis, "pfcount")


async def test_the_snapshot_is_the_in_memory_stores(store: RedisStore) -> None:
    # The hand-computed scenario of tests/stream: same counters, sums and (small sets: exact)
    # distinct counts as the reference store.
    memory = MemoryStore()
    for batch in scenario():
        await apply(memory, batch)
        await apply(store, batch)
    want, got = await memory.read(), await store.read()
    assert got.counters == want.counters
    assert got.pipeline == want.pipeline
    assert got.newest_event_ms == want.newest_event_ms
    assert got.open_visits == want.open_visits
    assert got.windows == want.windows
    assert await store.read() == want  # and again, from what it cached


async def test_an_unchanged_store_is_not_counted_again(store: RedisStore, redis: Redis) -> None:
    await apply(store, page_views(0, ("c1", "a", H_MS), ("c1", "b", H_MS), ("c2", "a", H_MS)))
    before = await pfcount_calls(redis)
    first = await store.read()
    assert await pfcount_calls(redis) > before
    before = await pfcount_calls(redis)
    again = await store.read()
    assert await pfcount_calls(redis) == before
    assert again == first
    assert uniques(again, "c1", "5m") == 2


async def test_only_the_partitions_that_committed_are_read_again(
    redis: Redis, clock: Clock
) -> None:
    store = RedisStore(redis, 2, f"t{uuid.uuid4().hex[:8]}", clock=clock)
    a, b = visitors_of(0, 2, 1)[0], visitors_of(1, 2, 2)
    await apply(store, page_views(0, ("c1", a, H_MS), partition=0), partitions=2)
    await apply(store, page_views(0, ("c1", b[0], H_MS), partition=1), partitions=2)
    first = await store.read()
    assert first.counters["c1"]["page_views"] == 2
    before = await calls(redis, "hgetall")
    assert await store.read() is first  # nothing changed: the very same snapshot
    assert await calls(redis, "hgetall") - before == 2  # the two partitions' meta, nothing else
    await apply(store, page_views(1, ("c2", b[1], H_MS), partition=1), partitions=2)
    before = await calls(redis, "hgetall")
    snap = await store.read()
    # Both metas, then what the one commit since changed in partition 1 only: its counters,
    # pipeline totals and the window buckets of its event (one per bucket size).
    assert await calls(redis, "hgetall") - before == 2 + 2 + len(WINDOWS)
    assert (snap.counters["c1"]["page_views"], snap.counters["c2"]["page_views"]) == (2, 1)
    assert snap.pipeline["processed"] == 3
    assert snap == await RedisStore(redis, 2, store.prefix).read()  # as a first read sees it
    # Two commits since the last read: which hashes changed is not known, all are read again.
    await apply(store, page_views(2, ("c2", b[1], H_MS + 1), partition=1), partitions=2)
    await apply(store, page_views(3, ("c1", b[0], H_MS + 2), partition=1), partitions=2)
    before = await calls(redis, "hgetall")
    snap = await store.read()
    buckets = sum(spec.buckets for spec in WINDOWS)
    assert await calls(redis, "hgetall") - before == 2 + 2 + buckets
    assert (snap.counters["c1"]["page_views"], snap.counters["c2"]["page_views"]) == (3, 2)
    assert snap == await RedisStore(redis, 2, store.prefix).read()


async def test_a_commit_that_does_not_name_what_it_changed_makes_a_full_read(
    store: RedisStore, redis: Redis
) -> None:
    # A worker of an older release commits without ``touched``: the field left behind names
    # the commit before (its rev), so the reader cannot trust it and reads everything.
    await apply(store, page_views(0, ("c1", "a", H_MS)))
    assert (await store.read()).counters["c1"]["page_views"] == 1
    meta = store.key(0, "meta")
    await redis.hincrby(meta, "rev", 1)
    hour_before = H_MS - H_MS % 3_600_000 - 3_600_000  # in the 24h window; not in ``touched``
    await redis.hincrby(store.key(0, f"w:3600000:{hour_before}"), "c1\x1fpage_views", 1)
    snap = await store.read()
    assert snap.windows["c1", "24h"].sums["page_views"] == 1
    assert snap == await RedisStore(redis, 1, store.prefix).read()


async def test_a_partition_written_behind_its_meta_is_read_again_after_the_max_age(
    store: RedisStore, redis: Redis, clock: Clock
) -> None:
    await apply(store, page_views(0, ("c1", "a", H_MS)))
    assert (await store.read()).counters["c1"]["page_views"] == 1
    # A counter changed without the commit's meta (what no release does; the bound holds anyway).
    await redis.hincrby(store.key(0, "cnt"), "c1\x1fpage_views", 1)
    assert (await store.read()).counters["c1"]["page_views"] == 1
    clock.now_s += MAX_AGE_S
    assert (await store.read()).counters["c1"]["page_views"] == 2


async def test_a_failed_read_leaves_nothing_half_cached(store: RedisStore, redis: Redis) -> None:
    await apply(store, page_views(0, ("c1", "a", H_MS)))
    assert (await store.read()).counters["c1"]["page_views"] == 1
    await apply(store, page_views(1, ("c1", "b", H_MS)))
    # The partition's new meta is read, then reading its hashes fails (a wrong type here).
    pipeline = await redis.hgetall(store.key(0, "pipe"))
    await redis.delete(store.key(0, "pipe"))
    await redis.set(store.key(0, "pipe"), "not a hash")
    with pytest.raises(ResponseError):
        await store.read()
    await redis.delete(store.key(0, "pipe"))
    await redis.hset(store.key(0, "pipe"), mapping=pipeline)
    snap = await store.read()
    assert snap.counters["c1"]["page_views"] == 2
    assert uniques(snap, "c1", "5m") == 2


async def test_an_add_to_a_campaign_changes_its_next_scrape(
    store: RedisStore, redis: Redis
) -> None:
    await apply(store, page_views(0, ("c1", "a", H_MS), ("c2", "a", H_MS)))
    assert uniques(await store.read(), "c1", "1h") == 1
    # Only the distinct-count add, no commit (as between a worker's PFADD and its commit):
    # nothing else in the store changed, yet c1 is counted again, and only c1.
    key = ("c1", UNIQUE_VISITORS, 300_000, H_MS)
    await store.add_uniques({key: {"b"}})
    before = await pfcount_calls(redis)
    snap = await store.read()
    assert uniques(snap, "c1", "1h") == 2
    assert uniques(snap, "c2", "1h") == 1
    assert await pfcount_calls(redis) - before == len(
        [k for k in snap.windows if k[0] == "c1" for _ in snap.windows[k].uniques]
    )


async def test_a_replayed_add_changes_no_version(store: RedisStore, redis: Redis) -> None:
    await apply(store, page_views(0, ("c1", "a", H_MS)))
    await store.read()
    version = await redis.get(store.unique_version_key("c1"))
    await store.add_uniques({("c1", UNIQUE_VISITORS, 60_000, H_MS): {"a"}})  # already there
    assert await redis.get(store.unique_version_key("c1")) == version
    before = await pfcount_calls(redis)
    await store.read()
    assert await pfcount_calls(redis) == before


async def test_a_bucket_leaving_the_window_changes_the_count(store: RedisStore) -> None:
    await apply(store, page_views(0, ("c1", "a", H_MS), ("c1", "b", H_MS + 3 * MIN_MS)))
    snap = await store.read()
    assert uniques(snap, "c1", "5m") == 2
    # Another campaign moves the windows' end to 22:06: c1's 22:00 bucket leaves its 5 min
    # window (22:02..22:06); c1's HyperLogLogs themselves did not change.
    await apply(store, page_views(2, ("c2", "x", H_MS + 6 * MIN_MS)))
    snap = await store.read()
    assert uniques(snap, "c1", "5m") == 1
    assert uniques(snap, "c1", "1h") == 2


async def test_a_count_is_read_again_after_its_max_age(
    store: RedisStore, redis: Redis, clock: Clock
) -> None:
    await apply(store, page_views(0, ("c1", "a", H_MS)))
    await store.read()
    clock.now_s += MAX_AGE_S / 2 - 1  # every count is kept at least half the max age
    before = await pfcount_calls(redis)
    await store.read()
    assert await pfcount_calls(redis) == before
    # A member added behind the versions' back (a worker of an older release): seen once the
    # counts are older than the max age.
    await redis.pfadd(store.unique_key("c1", UNIQUE_VISITORS, 300_000, H_MS), "b")
    assert uniques(await store.read(), "c1", "1h") == 1
    clock.now_s += MAX_AGE_S / 2 + 1
    assert uniques(await store.read(), "c1", "1h") == 2


async def test_a_new_store_marker_drops_every_cached_count(store: RedisStore, redis: Redis) -> None:
    await store.marker(create=True)
    await apply(store, page_views(0, ("c1", "a", H_MS)))
    assert uniques(await store.read(), "c1", "1h") == 1
    # The store is replaced (flushed and written again): the campaign's version counter starts
    # over and may reach the very value cached, but the marker is new.
    version = await redis.get(store.unique_version_key("c1"))
    hll = store.unique_key("c1", UNIQUE_VISITORS, 300_000, H_MS)
    await redis.delete(store.marker_key(), hll)
    await redis.pfadd(hll, "b", "c")
    await redis.set(store.unique_version_key("c1"), version or b"")
    await store.marker(create=True)
    assert uniques(await store.read(), "c1", "1h") == 2


async def test_window_buckets_past_retention_are_deleted_by_the_next_commit(
    store: RedisStore, redis: Redis
) -> None:
    """A commit finds the buckets past retention; the one after it deletes them (a script
    touches only the keys it is given)."""
    old, kept = (MIN_MS, H_MS, "c1", "visits"), (MIN_MS, H_MS + MIN_MS, "c1", "visits")
    first = Delta(0, 0, Watermark(H_MS, H_MS), windows=Counter({old: 1, kept: 1}))
    assert await store.commit(first, -1, DEDUP_RETENTION_MS)
    later = H_MS + MIN_MS + RETENTION_MS  # the oldest bucket kept starts at H_MS + MIN_MS
    assert await store.commit(Delta(0, 1, Watermark(later, later)), 0, DEDUP_RETENTION_MS)
    old_key = store.key(0, f"w:{MIN_MS}:{H_MS}")
    kept_key = store.key(0, f"w:{MIN_MS}:{H_MS + MIN_MS}")
    assert await redis.exists(old_key)  # found, not yet deleted
    assert await store.commit(Delta(0, 2, Watermark(later, later)), 1, DEDUP_RETENTION_MS)
    assert not await redis.exists(old_key)
    assert await redis.exists(kept_key)
    assert await redis.zrange(store.key(0, "wb"), 0, -1) == [kept_key.encode()]
