"""Tests of :mod:`agents.redis_visits`: open visits in small hashes, and the shards' due bounds.

The bound rules are checked on :func:`write_plan` (table rows); the shards, their bounds and the
never-missed close in Redis through :class:`RedisStore` against the session's real server, with
few shards so that shards hold many visits; and a random event stream applied through the Redis
store must give exactly what it gives through the in-memory store.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from unittest.mock import ANY

import orjson
import pytest
from redis.asyncio import Redis

from agents import redis_visits
from agents.embedded import EmbeddedRedis
from agents.redis_store import RedisStore, StoreLayoutError
from agents.redis_visits import (
    KEEP,
    REMOVE,
    SET,
    Scan,
    ScannedShard,
    open_shard,
    write_plan,
)
from stream.partition import (
    Delta,
    Limits,
    PartitionState,
    Record,
    VisitNeeds,
    decode,
)
from stream.store import MemoryStore, Store
from stream.visits import Visit, VisitKey, encode_key
from stream.watermark import Watermark

SHARDS = 4  # few shards: many visits per shard, as at scale


@pytest.fixture
def few_shards(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(redis_visits, "OPEN_SHARDS", SHARDS)
    yield


@pytest.fixture
async def store(redis_server: EmbeddedRedis, few_shards: None) -> AsyncIterator[RedisStore]:
    client = Redis.from_url(redis_server.url)
    try:
        yield RedisStore(client, partitions=1, prefix=f"t{uuid.uuid4().hex[:8]}")
    finally:
        await client.aclose()


def key_in(shard: int, n: int = 0) -> VisitKey:
    """The ``n``-th visit key (in a fixed order) that falls in ``shard``."""
    found = [k for i in range(1000) if open_shard(encode_key(k := ("c", f"v{i}"))) == shard]
    return found[n]


def one(last_ms: int, first_ms: int | None = None) -> list[Visit]:
    return [Visit(last_ms if first_ms is None else first_ms, last_ms, 1, 0, 1)]


# --- The plan, as arithmetic -----------------------------------------------------------------


LOWER = -1  # what a lone entry does to its shard's bound (in the script, from its value)


def steps(plan: redis_visits.WritePlan) -> dict[int, tuple[int, int]]:
    """Shard -> (op, bound) of a plan; the first ``plan.lowering`` lone entries lower their shard's
    bound to their due time (several to the smallest), the others leave it (KEEP)."""
    s = plan.steps
    ops = {s[i + 1]: (s[i + 2], s[i + 3]) for i in range(0, len(s), 6)}
    lone = zip(plan.lone, plan.lone_values, strict=True)
    for i, (shard, value) in enumerate(lone):
        if i >= plan.lowering:
            ops.setdefault(shard, (KEEP, 0))
            continue
        due = int(value.split(",")[1])
        op, bound = ops.get(shard, (LOWER, due))
        assert op in (KEEP, LOWER)  # a shard's deletes may be beside its lone entries
        ops[shard] = (LOWER, min(due, bound) if op == LOWER else due)
    return ops


def test_writes_lower_their_shards_bound_and_deletes_alone_leave_it(few_shards: None) -> None:
    a, b, c = key_in(0), key_in(0, 1), key_in(1)
    plan = write_plan({a: one(500), b: one(300), c: None}, scan=None)
    assert steps(plan) == {0: (LOWER, 300), 1: (KEEP, 0)}
    assert plan.strings.count(encode_key(c)) == 1


def test_keys_encoded_by_the_fetch_give_the_same_plan(few_shards: None) -> None:
    changed = {key_in(0): one(500), key_in(0, 1): None, key_in(1): one(300), key_in(1, 1): one(9)}
    fetched = {k: (encode_key(k), open_shard(encode_key(k))) for k in list(changed)[:2]}
    plain, reused = write_plan(changed, scan=None), write_plan(changed, None, fetched)
    assert reused == plain


@pytest.mark.parametrize(
    ("kept_low", "returned", "changed", "bound"),
    [
        # Shard 0 was scanned: entries kept (their smallest due), entries returned as due.
        pytest.param(900, {}, {}, (SET, 900), id="raised to the smallest kept"),
        pytest.param(900, {"x": 100}, {}, (SET, 100), id="a returned entry left alone holds it"),
        pytest.param(900, {"x": 100}, {"x": None}, (SET, 900), id="a closed one does not"),
        pytest.param(900, {"x": 100}, {"x": 950}, (SET, 900), id="rewritten: its new due counts"),
        pytest.param(900, {"x": 100}, {"x": 700}, (SET, 700), id="rewritten lower than kept"),
        pytest.param(None, {"x": 100}, {"x": None}, (REMOVE, 0), id="nothing left: removed"),
        pytest.param(None, {}, {"y": 50}, (SET, 50), id="a new entry in a scanned shard"),
    ],
)
def test_a_scanned_shards_bound(
    few_shards: None,
    kept_low: int | None,
    returned: dict[str, int],
    changed: dict[str, int | None],
    bound: tuple[int, int],
) -> None:
    keys = {"x": key_in(0), "y": key_in(0, 1)}
    scan = Scan(
        7, {0: ScannedShard(kept_low, {encode_key(keys[f]): d for f, d in returned.items()})}
    )
    delta = {keys[f]: (None if d is None else one(d)) for f, d in changed.items()}
    assert steps(write_plan(delta, scan))[0] == bound


@pytest.mark.parametrize(
    ("stored", "written", "bound"),
    [
        pytest.param(None, 500, (LOWER, 500), id="a new key lowers"),
        pytest.param(400, 500, (KEEP, 0), id="a later due: the bound is below already"),
        pytest.param(500, 500, (KEEP, 0), id="the same due"),
        pytest.param(500, 300, (LOWER, 300), id="an earlier visit (a late event) lowers"),
    ],
)
def test_a_lone_rewrite_lowers_its_bound_only_below_the_due_it_was_read_with(
    few_shards: None, stored: int | None, written: int, bound: tuple[int, int]
) -> None:
    key = key_in(1)
    scan = Scan(7, {0: ScannedShard(900)}, {} if stored is None else {key: stored})
    visits = one(written) if stored is None or written >= stored else [*one(written), *one(stored)]
    assert steps(write_plan({key: visits}, scan))[1] == bound
    assert steps(write_plan({key: visits}, Scan(7, {}, scan.dues)))[1] == bound  # none scanned
    assert steps(write_plan({key: visits}, None))[1] == (LOWER, written)  # no fetch: lowers


# --- In Redis ----------------------------------------------------------------------------------


async def put(
    store: RedisStore, visits: dict[VisitKey, list[Visit] | None], fetch_first: int | None = None
) -> None:
    """Commit open-visit changes on partition 0 (after a fetch of due < ``fetch_first``)."""
    snapshot = await store.load(0)
    if fetch_first is not None:
        await store.visits(0, VisitNeeds([], fetch_first))
    delta = Delta(0, snapshot.offset + 1, Watermark(0, 0))
    delta.visits = visits
    assert await store.commit(delta, snapshot.offset, 86_400_000)


async def bound(store: RedisStore, shard: int) -> float | None:
    return await store.redis.zscore(store.key(0, "due"), shard)  # type: ignore[no-any-return]


async def test_shards_hold_their_keys_compactly_and_fetches_cross_them(store: RedisStore) -> None:
    keys = [("c", f"v{i}") for i in range(200)]
    await put(store, {k: one(1000 + i) for i, k in enumerate(keys)})
    for shard in range(SHARDS):
        key = store.key(0, f"open:{shard}")
        fields = {f.decode() for f in await store.redis.hkeys(key)}
        assert fields == {encode_key(k) for k in keys if open_shard(encode_key(k)) == shard}
        assert await store.redis.object("encoding", key) == b"listpack"
        low = min(1000 + i for i, k in enumerate(keys) if open_shard(encode_key(k)) == shard)
        assert await bound(store, shard) == low
    asked = [*keys[::9], ("c", "nobody")]
    got = await store.visits(0, VisitNeeds(asked, 0))
    assert got == {k: one(1000 + keys.index(k)) for k in keys[::9]}
    due = await store.visits(0, VisitNeeds([], 1050))  # due strictly before 1050
    assert due == {k: one(1000 + i) for i, k in enumerate(keys) if 1000 + i < 1050}


async def test_commits_across_thousands_of_shards(redis_server: EmbeddedRedis) -> None:
    """The real shard count: one commit writes to over a thousand shards (the index changes go
    in chunked calls), a fetch asks for every key, a due scan returns all, and closing them all
    empties the index."""
    client = Redis.from_url(redis_server.url)
    try:
        store = RedisStore(client, partitions=1, prefix=f"t{uuid.uuid4().hex[:8]}")
        keys = [("c", f"v{i}") for i in range(5000)]
        shards = {open_shard(encode_key(k)) for k in keys}
        assert len(shards) > 1000
        await put(store, {k: one(1000 + i % 7) for i, k in enumerate(keys)})
        assert await client.zcard(store.key(0, "due")) == len(shards)
        got = await store.visits(0, VisitNeeds(keys, 0))
        assert got == {k: one(1000 + i % 7) for i, k in enumerate(keys)}
        await put(store, {k: one(2000) for k in keys[::2]}, fetch_first=3000)  # scans all
        scores = dict(await client.zrange(store.key(0, "due"), 0, -1, withscores=True))
        for shard in shards:  # set to the smallest due time left in each shard
            left = [
                1000 + i % 7 if i % 2 else 2000
                for i, k in enumerate(keys)
                if open_shard(encode_key(k)) == shard
            ]
            assert scores[str(shard).encode()] == min(left)
        await put(store, dict.fromkeys(keys), fetch_first=3000)  # all due: all deleted
        assert await client.zcard(store.key(0, "due")) == 0
        assert not await client.exists(*(store.key(0, f"open:{shard}") for shard in shards))
    finally:
        await client.aclose()


async def test_a_stale_bound_costs_a_scan_never_a_close(store: RedisStore) -> None:
    a, b = key_in(0), key_in(0, 1)
    await put(store, {a: one(100), b: one(500)})
    await put(store, {a: one(900, 100)})  # a moves on; no scan: the bound stays 100 (stale)
    assert await bound(store, 0) == 100
    await store.redis.zadd(store.key(0, "due"), {"0": 1})  # staler still, by hand
    assert await store.visits(0, VisitNeeds([], 200)) == {}  # scanned: nothing due yet
    await put(store, {})  # the commit after the scan raises the bound to what is there
    assert await bound(store, 0) == 500
    assert await store.visits(0, VisitNeeds([], 600)) == {b: one(500)}
    assert await store.visits(0, VisitNeeds([], 1000)) == {a: one(900, 100), b: one(500)}


async def test_a_rewrite_lowers_its_shards_bound_only_when_its_due_time_falls(
    store: RedisStore,
) -> None:
    """A key the fetch found and the commit rewrites leaves the bound alone when its due time
    did not fall; a late event that opens an earlier visit for it makes it fall: then the bound
    follows, or that visit would close only when the later one does."""
    a, b = key_in(0), key_in(0, 1)
    await put(store, {a: one(500), b: one(800)})
    assert await bound(store, 0) == 500

    async def rewrite(visits: list[Visit]) -> None:
        snapshot = await store.load(0)
        assert await store.visits(0, VisitNeeds([a], 0)) == {a: ANY}  # found, nothing scanned
        delta = Delta(0, snapshot.offset + 1, Watermark(0, 0))
        delta.visits = {a: visits}
        assert await store.commit(delta, snapshot.offset, 86_400_000)

    await rewrite(one(900, 100))
    assert await bound(store, 0) == 500  # left: still below every due time in the shard
    both = [Visit(200, 300, 1, 0, 1), Visit(100, 900, 2, 0, 2)]  # a late event's visit first
    await rewrite(both)
    assert await bound(store, 0) == 300
    assert await store.visits(0, VisitNeeds([], 400)) == {a: both}


async def test_a_due_visit_left_open_keeps_its_shard_due(store: RedisStore) -> None:
    """A fetched due visit the step neither closes nor rewrites (a forwarded or duplicate event
    moved the bound, not the watermark) is still found by the next fetch."""
    a, b = key_in(0), key_in(0, 1)
    await put(store, {a: one(100), b: one(500)})
    await put(store, {}, fetch_first=200)  # a fetched as due, left alone
    assert await bound(store, 0) == 100
    assert await store.visits(0, VisitNeeds([], 200)) == {a: one(100)}


async def test_held_visits_are_not_returned_yet_keep_their_shard_due(store: RedisStore) -> None:
    """A due visit the step holds is left out of the reply, not out of the scan: a commit that
    leaves it alone keeps its shard's bound at its due time."""
    a, b = key_in(0), key_in(0, 1)
    await put(store, {a: one(100), b: one(150)})
    snapshot = await store.load(0)
    assert await store.visits(0, VisitNeeds([], 200, held={a})) == {b: one(150)}
    delta = Delta(0, snapshot.offset + 1, Watermark(0, 0))
    delta.visits = {b: None}  # b closed; a neither closed nor rewritten
    assert await store.commit(delta, snapshot.offset, 86_400_000)
    assert await bound(store, 0) == 100
    assert await store.visits(0, VisitNeeds([], 200)) == {a: one(100)}


async def test_a_shard_closed_empty_leaves_the_index(store: RedisStore) -> None:
    a = key_in(2)
    await put(store, {a: one(100)})
    await put(store, {a: None}, fetch_first=200)
    assert await bound(store, 2) is None
    assert not await store.redis.exists(store.key(0, "open:2"))


async def test_a_scan_older_than_the_stored_offset_only_lowers_bounds(
    redis_server: EmbeddedRedis, store: RedisStore
) -> None:
    """A fetch, then another worker's commit, then a commit without a new fetch: the old scan
    (shard 0 held only ``a``) must not drop the shard from the index once ``a`` is closed, since
    the other worker wrote ``b`` there."""
    a, b = key_in(0), key_in(0, 1)
    await put(store, {a: one(100)})
    await store.visits(0, VisitNeeds([], 200))  # scanned at this offset: nothing else in 0
    other_client = Redis.from_url(redis_server.url)
    try:
        await put(RedisStore(other_client, 1, store.prefix), {b: one(150)})
    finally:
        await other_client.aclose()
    snapshot = await store.load(0)
    delta = Delta(0, snapshot.offset + 1, Watermark(0, 0))
    delta.visits = {a: None}
    assert await store.commit(delta, snapshot.offset, 86_400_000)
    assert await bound(store, 0) == 100  # left as it was: stale, never too high
    assert await store.visits(0, VisitNeeds([], 200)) == {b: one(150)}


async def test_a_partition_of_another_layout_is_refused(store: RedisStore) -> None:
    await store.redis.hset(
        store.key(0, "meta"), mapping={"offset": 5, "watermark_ms": 0, "newest_event_ms": 0}
    )
    with pytest.raises(StoreLayoutError, match="replay"):
        await store.load(0)


# --- The Redis store gives what the in-memory store gives ----------------------------------------

GAP_MS = 60_000


def random_batches(seed: int, batches: int) -> list[list[Record]]:
    """Events of a few visitors, in time order with jitter, some repeated, cut into batches."""
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000) - 86_400_000
    out: list[list[Record]] = []
    offset = 0
    sent: list[bytes] = []
    for _ in range(batches):
        batch = []
        for _ in range(rng.randint(1, 12)):
            now_ms += rng.choice([0, 1_000, 20_000, 50_000, 90_000])
            if sent and rng.random() < 0.05:
                value = rng.choice(sent)  # a duplicate event id
            else:
                event = {
                    "event_id": f"e{offset}-{rng.random()}",
                    "type": rng.choice(["page_view", "page_view", "interaction", "share"]),
                    "ts": now_ms - rng.randint(0, 30_000),  # out of order within the gap
                    "campaign_id": rng.choice(["c1", "c2"]),
                    "visitor_id": f"v{rng.randint(0, 30)}",
                }
                value = orjson.dumps(event)
                sent.append(value)
            batch.append(Record(0, offset, None, value))
            offset += 1
        out.append(batch)
    closer = {"event_id": "closer", "type": "page_view", "ts": now_ms + 10 * GAP_MS}
    closer |= {"campaign_id": "c1", "visitor_id": "closer"}
    out.append([Record(0, offset, None, orjson.dumps(closer))])
    return out


async def run(store: Store, batches: list[list[Record]], keep: int) -> list[tuple[object, ...]]:
    """Apply the batches as the worker does (fetch what it does not hold, apply, commit, keep up
    to ``keep`` visits held); the totals after each."""
    limits = Limits(gap_ms=GAP_MS, lateness_ms=600_000)
    state = PartitionState(0, 1, limits, b"key")
    seen_totals = []
    for batch in batches:
        decoded = decode(batch)
        now = time.time()
        needs = state.visit_needs(decoded, now)
        seen = await store.seen(0, needs.ids)
        state.load_visits(await store.visits(0, needs), needs)
        expected = state.offset
        delta = state.apply(decoded, seen, now, needs)
        await store.add_uniques(delta.uniques)
        assert await store.commit(delta, expected, 86_400_000)
        state.evict_visits(keep, delta.visits)
        snap = await store.read()
        counters = {c: dict(v) for c, v in snap.counters.items()}
        seen_totals.append((counters, snap.open_visits, dict(snap.pipeline)))
    return seen_totals


@pytest.mark.parametrize("keep", [0, 16], ids=["nothing held", "visits held"])
@pytest.mark.parametrize("seed", range(6))
async def test_random_traffic_through_redis_equals_the_in_memory_store(
    store: RedisStore, seed: int, keep: int
) -> None:
    batches = random_batches(seed, 60)
    want = await run(MemoryStore(), batches, keep)
    got = await run(store, batches, keep)
    assert got == want
    assert want[-1][1] == 1  # everything closed but the closer: visits did close on the way


async def test_a_commit_is_fenced_by_an_idle_advance_committed_since_its_read(
    redis_server: EmbeddedRedis, store: RedisStore
) -> None:
    """A zombie's idle advance keeps the offset: the owner's commit must still be refused, or the
    visits both close would count twice. The fence is the partition's commit count (``rev``)."""
    a = key_in(0)
    await put(store, {a: one(100)})
    snapshot = await store.load(0)  # the owner reads the partition
    other_client = Redis.from_url(redis_server.url)
    try:
        zombie = RedisStore(other_client, 1, store.prefix)
        stale = await zombie.load(0)
        idle = Delta(0, stale.offset, Watermark(5_000_000, 0))  # an idle advance: same offset
        idle.visits = {a: None}
        assert await zombie.commit(idle, stale.offset, 86_400_000)
    finally:
        await other_client.aclose()
    delta = Delta(0, snapshot.offset + 1, Watermark(5_000_000, 0))
    delta.visits = {a: None}
    assert not await store.commit(delta, snapshot.offset, 86_400_000)
    reloaded = await store.load(0)  # after a reload, the owner commits again
    assert await store.commit(delta, reloaded.offset, 86_400_000)
