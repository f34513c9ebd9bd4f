"""Tests of :mod:`agents.redis_dedup`: digests of counted ids, kept by generations of event time.

The generation rules are checked as arithmetic (table rows and a property over random commit
sequences); the in-memory index against a plain set (property); the strings in Redis, and the
index read back from them, through :class:`RedisStore` against the real server of the session.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from agents import redis_dedup
from agents.embedded import EmbeddedRedis
from agents.redis_dedup import (
    SEGMENT_IDS,
    DigestIndex,
    Generation,
    Roll,
    advance,
    appends,
    digest,
    format_generations,
    parse_generations,
)
from agents.redis_store import RedisStore
from stream.partition import Delta
from stream.watermark import Watermark

R = 86_400_000  # the default retention, ms
H = 3_600_000


# --- Arithmetic ------------------------------------------------------------------------------


def test_digest_is_16_bytes_of_blake2b_and_distinguishes_ids() -> None:
    assert len(digest("e-1")) == 16
    assert digest("e-1") == digest("e-1") != digest("e-2")
    assert digest("é") != digest("e")  # UTF-8, not a lossy encoding


def test_the_generation_table_round_trips() -> None:
    table = [Generation(3, 1000, 5000, 12), Generation(4, 5000, -1, 7)]
    assert parse_generations(format_generations(table)) == table
    assert parse_generations(format_generations(table).encode()) == table
    assert parse_generations(None) == parse_generations("") == []


@pytest.mark.parametrize(
    ("table", "watermark", "adding", "after", "dropped", "target"),
    [
        # (gen, start, closed, count) before and after; dropped gens; target gen or None.
        pytest.param([], 0, 0, [], [], None, id="nothing to remember: no generation"),
        pytest.param([], 5, 10, [(0, 5, -1, 10)], [], 0, id="first ids open generation 0"),
        pytest.param([(0, 5, -1, 10)], 5 + R - 1, 3, [(0, 5, -1, 13)], [], 0, id="within R"),
        pytest.param(
            [(0, 5, -1, 10)],
            5 + R,
            3,
            [(0, 5, 5 + R, 10), (1, 5 + R, -1, 3)],
            [],
            1,
            id="R after its start: closed, a new one opens",
        ),
        pytest.param(
            [(0, 5, -1, 10)],
            5 + R,
            0,
            [(0, 5, 5 + R, 10)],
            [],
            None,
            id="closed by time even without ids",
        ),
        pytest.param(
            [(0, 5, 100, 10), (1, 100, -1, 4)],
            100 + R - 1,
            0,
            [(0, 5, 100, 10), (1, 100, -1, 4)],
            [],
            None,
            id="a closed one is kept until R after its close",
        ),
        pytest.param(
            [(0, 5, 100, 10), (1, 100, -1, 4)],
            100 + R,
            0,
            [(1, 100, 100 + R, 4)],
            [0],
            None,
            id="R after its close: dropped",
        ),
        pytest.param(
            [(0, 5, 100, 10), (1, 100, 100 + R, 4)],
            100 + 2 * R,
            2,
            [(2, 100 + 2 * R, -1, 2)],
            [0, 1],
            2,
            id="all dropped: the next number still follows theirs",
        ),
        pytest.param(
            [(0, 5, -1, 10**9)],
            6,
            1,
            [(0, 5, -1, 10**9 + 1)],
            [],
            0,
            id="no size limit: a generation closes by time only",
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
    ``w + retention``; the table only holds what the rules keep."""
    written: list[tuple[int, int]] = []  # (watermark, generation) of each commit's ids
    table: list[Generation] = []
    watermark = 0
    for step, adding in commits:
        watermark += step
        roll = advance(table, watermark, retention, adding)
        table = roll.generations
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
            else:
                assert watermark < g.closed_ms + retention
        assert [g.gen for g in table] == sorted({g.gen for g in table})


@pytest.mark.parametrize(
    ("before", "adding", "cut"),
    [
        pytest.param(0, 3, [(0, 3)], id="one string"),
        pytest.param(SEGMENT_IDS - 2, 5, [(0, 2), (1, 3)], id="across a boundary"),
        pytest.param(SEGMENT_IDS, 1, [(1, 1)], id="a full one: the next"),
    ],
)
def test_appends_fill_each_string_to_its_size(
    before: int, adding: int, cut: list[tuple[int, int]]
) -> None:
    digests = b"".join(digest(f"e{i}") for i in range(adding))
    target = Generation(7, 0, count=before + adding)
    got = appends("p:", target, digests)
    assert [(key, len(part) // 16) for key, part in got] == [(f"p:7:{s}", n) for s, n in cut]
    assert b"".join(part for _, part in got) == digests
    keys = redis_dedup.generation_keys("p:", target)
    assert keys == [f"p:7:{s}" for s in range(cut[-1][0] + 1)]


# --- The index ---------------------------------------------------------------------------------


def blob(ids: list[str]) -> bytes:
    return b"".join(digest(i) for i in ids)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 400), max_size=80), min_size=1, max_size=25),
    st.lists(st.integers(0, 500), max_size=60),
)
def test_the_index_answers_as_a_set_of_what_was_committed(
    batches: list[list[int]], probe: list[int]
) -> None:
    index, held = DigestIndex([], {}), set()
    table: list[Generation] = []
    for n, batch in enumerate(batches):
        new = [f"e{i}" for i in dict.fromkeys(batch) if f"e{i}" not in held]
        roll = advance(table, n, R, len(new))
        index.committed(roll, blob(new))
        table = roll.generations
        held.update(new)
        ids = [f"e{i}" for i in probe]
        if ids:
            assert index.contains(blob(ids)).tolist() == [i in held for i in ids]
    assert len(index) == len(held)
    sizes = index.runs()  # one generation: its runs more than halve from the oldest on
    assert all(older > 2 * newer for older, newer in itertools.pairwise(sizes))


def test_equal_first_halves_are_told_apart_by_the_second() -> None:
    """Distinct digests whose first 8 bytes are equal (about n / 2**64 per look-up)."""
    head = bytes(range(8))
    stored = [head + bytes([9] * 8), head + bytes([3] * 8), head + bytes([5] * 8)]
    index = DigestIndex([Generation(0, 0, count=3)], {0: b"".join(stored)})
    probes = [*stored, head + bytes([4] * 8), bytes(8) + bytes([9] * 8)]
    assert index.contains(b"".join(probes)).tolist() == [True, True, True, False, False]


def test_a_dropped_generation_leaves_the_index() -> None:
    index = DigestIndex([], {})
    first = advance([], 0, R, 2)
    index.committed(first, blob(["a", "b"]))
    second = advance(first.generations, R, R, 1)  # 0 closes, 1 opens
    index.committed(second, blob(["c"]))
    assert index.contains(blob(["a", "c"])).tolist() == [True, True]
    third = advance(second.generations, 2 * R, R, 0)  # 0 dropped
    assert [g.gen for g in third.dropped] == [0]
    index.committed(third, b"")
    assert index.contains(blob(["a", "b", "c"])).tolist() == [False, False, True]
    assert index.text == format_generations(third.generations)


def test_an_index_refuses_strings_its_table_does_not_describe() -> None:
    with pytest.raises(ValueError, match="holds 1 digests, its table says 2"):
        DigestIndex([Generation(0, 0, count=2)], {0: digest("a")})


def test_contains_keeps_the_order_and_repeats_of_the_probe() -> None:
    index = DigestIndex([], {})
    index.committed(Roll([Generation(0, 0, count=1)], [], Generation(0, 0, count=1)), blob(["a"]))
    found = index.contains(blob(["b", "a", "a", "c"]))
    assert found.dtype == np.bool_ and found.tolist() == [False, True, True, False]


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
    # What Redis holds is the digests, end to end, not the ids.
    assert await store.redis.get(store.key(0, "seen:0:0")) == digest("a") + digest("b")


@pytest.mark.parametrize(
    ("asked", "counted"),
    [
        pytest.param(["a", "b", "c"], ["a", "b", "c"], id="every id asked counted"),
        pytest.param(["a", "b", "c", "a"], ["a", "b", "c"], id="a duplicate in the step"),
        pytest.param(["a", "b", "c"], ["c", "a"], id="some not counted"),
        pytest.param(["x", "y"], ["c", "a"], id="none asked (as many)"),
        pytest.param([], ["a"], id="no look-up"),
    ],
)
async def test_a_commit_stores_the_digests_of_what_it_counted(
    store: RedisStore, asked: list[str], counted: list[str]
) -> None:
    """Whatever the step looked up before: the look-up's digests are reused, never trusted."""
    await store.seen(0, asked)
    await remember(store, counted, 1000)
    stored = await store.redis.get(store.key(0, "seen:0:0"))
    assert sorted(stored[i : i + 16] for i in range(0, len(stored), 16)) == sorted(
        digest(i) for i in counted
    )
    assert await store.seen(0, ["a", "b", "c", "x"]) == set(counted)


async def test_a_store_that_loads_the_partition_reads_every_id_back(
    redis_server: EmbeddedRedis, store: RedisStore
) -> None:
    """Another worker's store (a restart, a rebalance) answers from what Redis holds."""
    ids = [f"e{i}" for i in range(5000)]
    await remember(store, ids[:3000], 1000)
    await remember(store, ids[3000:], R + 1000)  # a second generation
    client = Redis.from_url(redis_server.url)
    try:
        other = RedisStore(client, partitions=1, prefix=store.prefix)
        await other.load(0)
        probe = [*ids[::7], "new-1", "new-2"]
        assert await other.seen(0, probe) == set(ids[::7])
    finally:
        await client.aclose()


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


async def test_a_stale_index_never_commits(redis_server: EmbeddedRedis, store: RedisStore) -> None:
    """Two workers' stores: the other commits after this one loaded. This one's look-up was
    answered on the state it loaded; its commit is fenced out, and once reloaded it finds the
    other's ids."""
    await remember(store, ["old"], 0)
    snapshot = await store.load(0)
    client = Redis.from_url(redis_server.url)
    try:
        other = RedisStore(client, partitions=1, prefix=store.prefix)
        await remember(other, ["new"], 24 * H)  # generation 1 opens
    finally:
        await client.aclose()
    assert await store.seen(0, ["old", "new"]) == {"old"}  # the state it loaded
    delta = Delta(0, snapshot.offset + 1, Watermark(24 * H, 24 * H))
    delta.seen = ["new"]
    assert not await store.commit(delta, snapshot.offset, R)
    await store.load(0)
    assert await store.seen(0, ["old", "new", "none"]) == {"old", "new"}
    assert await store.redis.get(store.key(0, "seen:1:0")) == digest("new")


async def test_a_store_of_another_layout_is_refused(store: RedisStore) -> None:
    await store.redis.hset(store.key(0, "meta"), mapping={"layout": "2", "seen": "0,16,5,-1,3"})
    with pytest.raises(Exception, match="another store layout"):
        await store.load(0)
