"""Tests of :mod:`agents.redis_dedup`: digests of counted ids, kept by generations of event time.

The generation rules are checked as arithmetic (table rows and a property over random commit
sequences); the digests, shards and generations in Redis through :class:`RedisStore` against the
real server of the session.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from agents import redis_dedup
from agents.embedded import EmbeddedRedis
from agents.redis_dedup import (
    FILL_MAX,
    FILL_TARGET,
    MERGE_MAX,
    SHARDS_MAX,
    SHARDS_MIN,
    Generation,
    advance,
    digest,
    format_generations,
    parse_generations,
    shard_of,
    shards_for,
)
from agents.redis_store import RedisStore
from stream.partition import Delta
from stream.watermark import Watermark

R = 86_400_000  # the default retention, ms
BIG = 2 * MERGE_MAX  # shards of a generation too big to merge
H = 3_600_000


# --- Arithmetic ------------------------------------------------------------------------------


def test_digest_is_16_bytes_of_blake2b_and_distinguishes_ids() -> None:
    assert len(digest("e-1")) == 16
    assert digest("e-1") == digest("e-1") != digest("e-2")
    assert digest("é") != digest("e")  # UTF-8, not a lossy encoding


@pytest.mark.parametrize(
    ("ids", "shards"),
    [
        pytest.param(0, SHARDS_MIN, id="none: the minimum"),
        pytest.param(SHARDS_MIN * 32, SHARDS_MIN, id="exactly the minimum's target fill"),
        pytest.param(SHARDS_MIN * 32 + 1, 2 * SHARDS_MIN, id="one more: the next power of two"),
        pytest.param(10**12, SHARDS_MAX, id="beyond: the maximum"),
    ],
)
def test_shards_for_sizes_to_the_target_fill(ids: int, shards: int) -> None:
    assert shards_for(ids) == shards


def test_shard_of_takes_the_first_two_bytes_modulo_the_shards() -> None:
    d = bytes([0x12, 0x34]) + bytes(14)
    assert shard_of(d, 16) == 0x4
    assert shard_of(d, 65536) == 0x1234


def test_the_generation_table_round_trips() -> None:
    table = [Generation(3, 64, 1000, 5000, 12), Generation(4, 256, 5000, -1, 7)]
    assert parse_generations(format_generations(table)) == table
    assert parse_generations(format_generations(table).encode()) == table
    assert parse_generations(None) == parse_generations("") == []


@pytest.mark.parametrize(
    ("table", "watermark", "adding", "after", "dropped", "target"),
    [
        # (gen, shards, start, closed, count) before and after; dropped gens; target gen or None.
        pytest.param([], 0, 0, [], [], None, id="nothing to remember: no generation"),
        pytest.param([], 5, 10, [(0, 16, 5, -1, 10)], [], 0, id="first ids open generation 0"),
        pytest.param(
            [(0, 16, 5, -1, 10)], 5 + R - 1, 3, [(0, 16, 5, -1, 13)], [], 0, id="within R: same"
        ),
        pytest.param(
            [(0, 16, 5, -1, 10)],
            5 + R,
            3,
            [(0, 16, 5, 5 + R, 10), (1, 16, 5 + R, -1, 3)],
            [],
            1,
            id="R after its start: closed, a new one opens",
        ),
        pytest.param(
            [(0, 16, 5, -1, 10)],
            5 + R,
            0,
            [(0, 16, 5, 5 + R, 10)],
            [],
            None,
            id="closed by time even without ids",
        ),
        pytest.param(
            [(0, 16, 5, 100, 10), (1, 16, 100, -1, 4)],
            100 + R - 1,
            0,
            [(0, 16, 5, 100, 10), (1, 16, 100, -1, 4)],
            [],
            None,
            id="a closed one is kept until R after its close",
        ),
        pytest.param(
            [(0, 16, 5, 100, 10), (1, 16, 100, -1, 4)],
            100 + R,
            0,
            [(1, 16, 100, 100 + R, 4)],
            [0],
            None,
            id="R after its close: dropped",
        ),
        pytest.param(
            [(0, BIG, 5, -1, BIG * FILL_MAX - 1)],
            6,
            2,
            [(0, BIG, 5, 6, BIG * FILL_MAX - 1), (1, 4 * BIG, 6, -1, 2)],
            [],
            1,
            id="full: closed early, four times bigger next",
        ),
        pytest.param(
            [(0, BIG, 5, 6, BIG * FILL_MAX), (1, 4 * BIG, 6, -1, 2)],
            7,
            0,
            [(0, BIG, 5, 6, BIG * FILL_MAX), (1, 4 * BIG, 6, -1, 2)],
            [],
            None,
            id="closed early: still kept R after its close",
        ),
        pytest.param(
            [(0, 16, 5, -1, 16 * FILL_MAX - 1)],
            6,
            2,
            [(1, 64, 6, -1, 16 * FILL_MAX + 1)],
            [],
            1,
            id="full and small: merged into the next, four times bigger",
        ),
        pytest.param(
            [(0, 1024, 5, 5 + R, 100), (1, 16, R, -1, 16 * FILL_MAX)],
            R + 1,
            4096,
            [(0, 1024, 5, 5 + R, 100), (2, 256, R + 1, -1, 16 * FILL_MAX + 4096)],
            [],
            2,
            id="merged with a big batch: sized for both",
        ),
        pytest.param(
            [(0, SHARDS_MAX, 5, -1, SHARDS_MAX * FILL_MAX)],
            6,
            1,
            [(0, SHARDS_MAX, 5, -1, SHARDS_MAX * FILL_MAX + 1)],
            [],
            0,
            id="the largest is never closed early",
        ),
        pytest.param(
            [(0, 1024, 5, 5 + R, 100)],
            5 + R + 1,
            1,
            [(0, 1024, 5, 5 + R, 100), (1, SHARDS_MIN, 5 + R + 1, -1, 1)],
            [],
            1,
            id="after a time close, sized for the previous one's ids",
        ),
        pytest.param(
            [],
            9,
            40_000,
            [(0, 2048, 9, -1, 40_000)],
            [],
            0,
            id="a big first batch sizes its generation",
        ),
    ],
)
def test_advance(
    table: list[tuple[int, ...]],
    watermark: int,
    adding: int,
    after: list[tuple[int, ...]],
    dropped: list[int],
    target: int | None,
) -> None:
    before = [Generation(*g) for g in table]
    roll = advance(before, watermark, R, adding)
    assert roll.generations == [Generation(*g) for g in after]
    assert [g.gen for g in roll.dropped] == dropped
    assert (roll.target.gen if roll.target else None) == target
    full = [g for g in before if g.open and g.count + adding > g.shards * FILL_MAX]
    merged = full[0].gen if adding and full and full[0].shards <= MERGE_MAX else None
    assert (roll.merged.gen if roll.merged else None) == merged
    assert before == [Generation(*g) for g in table]  # not modified


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 30 * H), st.integers(0, 3000)), min_size=1, max_size=60),
    st.sampled_from([H, 24 * H]),
)
def test_an_id_is_remembered_for_at_least_the_retention(
    commits: list[tuple[int, int]], retention: int
) -> None:
    """Every id written at watermark ``w`` is in a live generation while the watermark is below
    ``w + retention``; the table only holds what the rules keep; an open generation fits."""
    written: list[tuple[int, int]] = []  # (watermark, generation) of each commit's ids
    table: list[Generation] = []
    watermark = 0
    for step, adding in commits:
        watermark += step
        roll = advance(table, watermark, retention, adding)
        table = roll.generations
        if roll.merged is not None:  # its ids moved to the target
            assert roll.target is not None and roll.merged.shards <= MERGE_MAX
            written = [(w, roll.target.gen if g == roll.merged.gen else g) for w, g in written]
        if adding:
            assert roll.target is not None and roll.target is table[-1] and roll.target.open
            written.append((watermark, roll.target.gen))
        live = {g.gen for g in table}
        for w, gen in written:
            if watermark < w + retention:
                assert gen in live, f"an id written at {w} was dropped at {watermark}"
        for g in table:
            if g.open:
                assert g is table[-1] and watermark < g.start_ms + retention
                assert g.count <= g.shards * FILL_MAX or g.shards == SHARDS_MAX
            else:
                assert watermark < g.closed_ms + retention
        assert [g.gen for g in table] == sorted({g.gen for g in table})


# --- In Redis ----------------------------------------------------------------------------------


@pytest.fixture
async def store(redis_server: EmbeddedRedis) -> AsyncIterator[RedisStore]:
    client = Redis.from_url(redis_server.url)
    try:
        yield RedisStore(client, partitions=1, prefix=f"t{uuid.uuid4().hex[:8]}")
    finally:
        await client.aclose()


async def remember(
    store: RedisStore, ids: list[str], watermark_ms: int, retention_ms: int = R
) -> None:
    """Commit a batch counting ``ids`` at ``watermark_ms`` on partition 0."""
    snapshot = await store.load(0)
    delta = Delta(0, snapshot.offset + 1, Watermark(watermark_ms, watermark_ms))
    delta.seen = ids
    assert await store.commit(delta, snapshot.offset, retention_ms)


async def test_counted_ids_are_found_by_digest(store: RedisStore) -> None:
    assert await store.seen(0, ["a", "b"]) == set()
    await remember(store, ["a", "b"], 1000)
    assert await store.seen(0, ["a", "b", "c", "a"]) == {"a", "b"}
    # What Redis holds is the digest, not the id.
    members = await store.redis.smembers(store.key(0, f"seen:0:{shard_of(digest('a'), 16)}"))
    assert digest("a") in members and all(len(m) == 16 for m in members)


async def test_shards_hold_what_they_should_and_lookups_cross_them(store: RedisStore) -> None:
    ids = [f"e{i}" for i in range(3000)]  # a generation of 128 shards
    await remember(store, ids, 1000)
    for shard in range(128):
        key = store.key(0, f"seen:0:{shard}")
        members = await store.redis.smembers(key)
        assert members == {digest(i) for i in ids if shard_of(digest(i), 128) == shard}
        assert await store.redis.object("encoding", key) == b"listpack"
    probe = [*ids[::7], "new-1", "new-2"]
    assert await store.seen(0, probe) == set(ids[::7])


async def test_generations_roll_over_keeping_every_id_for_the_retention(
    store: RedisStore,
) -> None:
    await remember(store, ["day1"], 0)
    await remember(store, ["day1-late"], 23 * H)
    await remember(store, ["day2"], 24 * H)  # generation 0 closes at 24 h, 1 opens
    assert await store.seen(0, ["day1", "day1-late", "day2"]) == {"day1", "day1-late", "day2"}
    await remember(store, ["day2-late"], 48 * H - 1)  # 0 is kept until 24 h + R
    assert await store.seen(0, ["day1", "day1-late"]) == {"day1", "day1-late"}
    await remember(store, [], 48 * H)  # 0 dropped whole; 1 closes
    assert await store.seen(0, ["day1", "day1-late", "day2", "day2-late"]) == {
        "day2",
        "day2-late",
    }
    assert not await store.redis.keys(store.key(0, "seen:0:*"))
    await remember(store, [], 72 * H)  # 1 dropped: nothing left
    assert await store.seen(0, ["day2", "day2-late"]) == set()
    assert not await store.redis.keys(store.key(0, "seen:*"))


async def test_a_full_generation_gives_way_to_a_bigger_one_and_stays_readable(
    store: RedisStore,
) -> None:
    first = [f"a{i}" for i in range(SHARDS_MIN * FILL_TARGET)]  # sizes generation 0
    more = [f"m{i}" for i in range(SHARDS_MIN * (FILL_MAX - FILL_TARGET))]
    await remember(store, first, 1000)
    await remember(store, more, 1500)  # exactly full
    await remember(store, ["b0", "b1"], 2000)  # over the fill: generation 1, four times bigger
    table = parse_generations(await store.redis.hget(store.key(0, "meta"), "seen"))
    # Generation 0 was small: merged into 1 (its ids moved, its keys gone).
    assert [(g.gen, g.shards, g.open, g.count) for g in table] == [
        (1, 4 * SHARDS_MIN, True, len(first) + len(more) + 2)
    ]
    assert not await store.redis.keys(store.key(0, "seen:0:*"))
    probe = [*first[:50], *more[-50:], "b0", "b1", "c"]
    assert await store.seen(0, probe) == {*first[:50], *more[-50:], "b0", "b1"}
    for shard in range(4 * SHARDS_MIN):  # re-sharded: each id in its shard of generation 1
        members = await store.redis.smembers(store.key(0, f"seen:1:{shard}"))
        assert all(shard_of(m, 4 * SHARDS_MIN) == shard for m in members)
    remembered = [*first, *more, "b0", "b1"]
    assert await store.seen(0, remembered) == set(remembered)


async def test_a_lookup_never_uses_a_table_the_store_no_longer_has(
    redis_server: EmbeddedRedis, store: RedisStore
) -> None:
    """Two workers' stores: one rolls the generations over, the other's cached table is stale;
    its next look-up reads the stored table (the script refuses the stale one)."""
    await remember(store, ["old"], 0)
    other_client = Redis.from_url(redis_server.url)
    try:
        other = RedisStore(other_client, partitions=1, prefix=store.prefix)
        assert await other.seen(0, ["old"]) == {"old"}  # caches generation 0 alone
        await remember(store, ["new"], 24 * H)  # generation 1 opens
        assert await other.seen(0, ["old", "new", "none"]) == {"old", "new"}
    finally:
        await other_client.aclose()


def test_every_generation_key_is_listed_for_its_drop() -> None:
    keys = redis_dedup.generation_keys("p:", Generation(7, 16, 0))
    assert keys == [f"p:7:{s}" for s in range(16)]
