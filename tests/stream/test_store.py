"""Tests of :class:`stream.store.MemoryStore`, the in-memory store of the unit tests."""

from __future__ import annotations

from collections import Counter

from stream.partition import Delta
from stream.store import MemoryStore, PartitionSnapshot
from stream.visits import Visit
from stream.watermark import Watermark
from stream.windows import RETENTION_MS
from tests.stream.factories import (
    DEDUP_RETENTION_MS,
    H_MS,
    MIN_MS,
    event,
    load_state,
    now_after,
    process,
    record,
    run_scenario,
    scenario_batches,
)


def delta(partition: int = 0, offset: int = 0, watermark_ms: int = H_MS, **fields: object) -> Delta:
    wm = Watermark(watermark_ms, watermark_ms, watermark_ms, 0.0)
    d = Delta(partition, offset, wm)
    for name, value in fields.items():
        setattr(d, name, value)
    return d


async def test_unknown_partition_loads_empty() -> None:
    snap = await MemoryStore().load(3)
    assert snap == PartitionSnapshot()
    assert (snap.offset, snap.watermark.watermark_ms, snap.visits) == (-1, -1, {})


async def test_loaded_state_is_a_copy() -> None:
    store = MemoryStore()
    key = ("c1", "v1")
    assert await store.commit(delta(visits={key: [Visit(H_MS, H_MS, 1, 0, 1)]}), -1, 0)
    loaded = await store.load(0)
    loaded.visits[key][0].events = 99
    loaded.watermark.watermark_ms = 0
    again = await store.load(0)
    assert again.visits[key] == [Visit(H_MS, H_MS, 1, 0, 1)]
    assert again.watermark.watermark_ms == H_MS


async def test_commit_is_fenced_on_the_expected_offset() -> None:
    store = MemoryStore()
    first = delta(offset=5, counters=Counter({("c1", "page_views"): 1}), seen=["a"])
    assert await store.commit(first, -1, DEDUP_RETENTION_MS)
    stale = delta(offset=7, counters=Counter({("c1", "page_views"): 1}), seen=["b"])
    assert not await store.commit(stale, -1, DEDUP_RETENTION_MS)  # another worker moved on
    assert store.partitions[0].offset == 5
    assert store.counters[0] == Counter({("c1", "page_views"): 1})
    assert await store.seen(0, ["a", "b"]) == {"a"}


async def test_commit_replaces_and_removes_open_visits() -> None:
    store = MemoryStore()
    a, b = ("c1", "a"), ("c1", "b")
    one = Visit(H_MS, H_MS, 1, 0, 1)
    assert await store.commit(delta(visits={a: [one], b: [one]}, open_visits=2), -1, 0)
    assert await store.commit(delta(offset=1, visits={a: None}, open_visits=1), 0, 0)
    assert (await store.load(0)).visits == {b: [one]}
    assert (await store.read()).open_visits == 1


async def test_seen_is_per_partition_and_kept_for_the_retention() -> None:
    store = MemoryStore()
    assert await store.commit(delta(0, 0, H_MS, seen=["x"]), -1, DEDUP_RETENTION_MS)
    assert await store.seen(0, ["x", "y"]) == {"x"}
    assert await store.seen(1, ["x"]) == set()
    # Still there exactly one retention later, gone after.
    later = H_MS + DEDUP_RETENTION_MS
    assert await store.commit(delta(0, 1, later), 0, DEDUP_RETENTION_MS)
    assert await store.seen(0, ["x"]) == {"x"}
    assert await store.commit(delta(0, 2, later + 1), 1, DEDUP_RETENTION_MS)
    assert await store.seen(0, ["x"]) == set()


async def test_add_uniques_is_idempotent() -> None:
    store = MemoryStore()
    adds = {("c1", "v", MIN_MS, H_MS): {"a", "b"}}
    await store.add_uniques(adds)
    await store.add_uniques(adds)
    await store.add_uniques({("c1", "v", MIN_MS, H_MS): {"b", "c"}})
    assert store.uniques == {("c1", "v", MIN_MS, H_MS): {"a", "b", "c"}}


async def test_window_buckets_older_than_retention_are_dropped() -> None:
    store = MemoryStore()
    old, kept = (MIN_MS, H_MS, "c1", "visits"), (MIN_MS, H_MS + MIN_MS, "c1", "visits")
    assert await store.commit(delta(windows=Counter({old: 1, kept: 1})), -1, 0)
    assert await store.commit(delta(offset=1, watermark_ms=H_MS + MIN_MS + RETENTION_MS), 0, 0)
    assert store.windows[0] == Counter({kept: 1})


async def test_read_sums_partitions_and_ends_windows_at_the_newest_event() -> None:
    store = MemoryStore()
    p0 = delta(
        0,
        watermark_ms=H_MS,
        counters=Counter({("c1", "page_views"): 2, ("c1", "visits"): 1}),
        pipeline=Counter(processed=2),
        windows=Counter({(3_600_000, H_MS, "c1", "visits"): 1}),
        open_visits=1,
    )
    p1 = delta(
        1,
        watermark_ms=H_MS + 2 * 3_600_000,
        counters=Counter({("c1", "page_views"): 3, ("c2", "shares"): 1}),
        pipeline=Counter(processed=4, duplicates=1),
        open_visits=2,
    )
    assert await store.commit(p0, -1, DEDUP_RETENTION_MS)
    assert await store.commit(p1, -1, DEDUP_RETENTION_MS)
    await store.add_uniques({("c1", "v", 3_600_000, H_MS): {"a"}})
    await store.add_uniques({("c1", "v", 3_600_000, H_MS + 3_600_000): {"a", "b"}})
    snap = await store.read()
    assert snap.counters == {"c1": Counter(page_views=5, visits=1), "c2": Counter(shares=1)}
    assert snap.pipeline == Counter(processed=6, duplicates=1)
    assert snap.watermarks_ms == {0: H_MS, 1: H_MS + 2 * 3_600_000}
    assert snap.newest_event_ms == H_MS + 2 * 3_600_000  # windows end here, for every partition
    assert snap.open_visits == 3
    day = snap.windows[("c1", "24h")]
    assert (day.sums, day.uniques) == (Counter(visits=1), {"v": 2})  # union, not sum
    hour = snap.windows[("c1", "1h")]
    assert (+hour.sums, hour.uniques) == (Counter(), {})  # 22:00 is more than 1 h before 00:00


async def test_scenario_totals() -> None:
    # The scenario of factories.scenario_batches (hand-computed there).
    store = await run_scenario()
    snap = await store.read()
    assert snap.counters == {
        "c1": Counter(
            page_views=5,  # a, b, c twice, e
            interactions=3,  # b twice, and a's late one
            participations=2,  # d, b
            shares=1,  # c
            visits=4,  # a b c d closed; e open
            bounced_visits=1,  # a
            visit_duration_ms=610_000,  # 0 + 540 s + 70 s + 0
        )
    }
    assert +snap.pipeline == Counter(
        {"processed": 11, "late": 1, "duplicates": 1, "rejected:invalid_json": 1}
    )
    assert snap.watermarks_ms == {0: H_MS + 50 * MIN_MS}
    assert snap.newest_event_ms == H_MS + 50 * MIN_MS
    assert snap.open_visits == 1
    assert store.partitions[0].offset == 11
    assert store.partitions[0].visits == {
        ("c1", "e"): [Visit(H_MS + 50 * MIN_MS, H_MS + 50 * MIN_MS, 1, 0, 1)]
    }


async def test_scenario_replayed_from_the_start_changes_nothing() -> None:
    store = await run_scenario()
    before = await store.read()
    everything = [r for batch in scenario_batches() for r in batch]
    await process(store, await load_state(store), everything, now_after(H_MS + 50 * MIN_MS))
    assert await store.read() == before


async def test_no_raw_pii_in_the_store() -> None:
    store = await run_scenario()
    await process(
        store,
        await load_state(store),
        [
            record(
                12,
                event(
                    "z",
                    "participation",
                    H_MS + 50 * MIN_MS,
                    visitor_id="e",
                    participant={"first_name": "Zoé", "last_name": "Dupont", "email": "zoe@x.io"},
                ),
            )
        ],
        now_after(H_MS + 50 * MIN_MS),
    )
    dump = repr(vars(store)).casefold()
    for pii in ("alice", "martin", "example.com", "zoé", "dupont", "zoe@x.io"):
        assert pii not in dump
