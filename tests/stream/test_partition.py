"""Tests of :mod:`stream.partition`: what a batch of one partition's records changes."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.events import Reason
from stream.partition import (
    BOUNCED,
    DURATION_MS,
    INTERACTIONS,
    UNIQUE_PARTICIPANTS,
    UNIQUE_PARTICIPATING_VISITORS,
    UNIQUE_VISITORS,
    VISITS,
    Delta,
    Forward,
    Limits,
    PartitionState,
    Record,
    VisitNeeds,
    candidate_ids,
    decode,
)
from stream.partitioner import partition_for
from stream.store import MemoryStore
from stream.visits import Visit
from stream.windows import WINDOWS, bucket_start
from tests.stream.factories import (
    H_MS,
    KEY,
    MIN_MS,
    dumps,
    event,
    load_state,
    now_after,
    process,
    record,
)

LIMITS = Limits()  # gap 30 min, lateness 10 min, future 5 min, idle 60 s
GAP_MS = LIMITS.gap_ms
LATE_MS = LIMITS.lateness_ms
NOW_S = now_after(H_MS + 60 * MIN_MS)  # wall clock an hour after H: H..H+1h05 is not "future"


def state(partition: int = 0, partitions: int = 1, limits: Limits = LIMITS) -> PartitionState:
    return PartitionState(partition, partitions, limits, KEY)


def apply(
    st_: PartitionState, records: list[Record], seen: set[str] | None = None, now_s: float = NOW_S
) -> Delta:
    return st_.apply(decode(records), seen or set(), now_s)


def visitor_on(partition: int, partitions: int, other: bool = False, skip: int = 0) -> str:
    """A visitor id that Kafka's partitioner puts on ``partition`` (or, with ``other``, not);
    ``skip`` such ids are passed first."""
    found = (
        visitor
        for visitor in (f"visitor-{i}" for i in range(1000))
        if (partition_for(visitor, partitions) == partition) is not other
    )
    for visitor in found:
        if skip == 0:
            return visitor
        skip -= 1
    raise AssertionError("no such visitor")


# --- Decoding ----------------------------------------------------------------------------------


def test_decode_and_candidate_ids() -> None:
    records = [
        record(0, event("a")),
        record(1, [event("b"), {"bad": 1}, event("c")]),
        record(2, b"not json"),
        record(3, None),
    ]
    decoded = decode(records)
    assert [d.record for d in decoded] == records
    assert [len(d.items) for d in decoded] == [1, 3, 1, 1]
    assert candidate_ids(decoded) == ["a", "b", "c"]


# --- Replays -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("applied_offset", "counted"),
    [
        pytest.param(-1, ["e0", "e1", "e2", "e3"], id="fresh-partition-counts-all"),
        pytest.param(1, ["e2", "e3"], id="offsets-at-or-below-applied-are-skipped"),
        pytest.param(3, [], id="whole-batch-replayed"),
    ],
)
def test_replayed_offsets_are_skipped(applied_offset: int, counted: list[str]) -> None:
    s = PartitionState(0, 1, LIMITS, KEY, offset=applied_offset)
    records = [record(i, event(f"e{i}", ts=H_MS + i)) for i in range(4)]
    delta = apply(s, records)
    assert sorted(delta.seen) == counted
    assert delta.pipeline["processed"] == len(counted)
    assert delta.offset == s.offset == 3
    assert delta.empty is (not counted)


def test_applying_the_same_batch_twice_changes_nothing_the_second_time() -> None:
    s = state()
    records = [record(i, event(f"e{i}", ts=H_MS + i, visitor_id=f"v{i}")) for i in range(3)]
    first = apply(s, records)
    assert first.counters[("c1", "page_views")] == 3
    second = apply(s, records)
    assert second.empty and not second.counters and not second.seen and not second.uniques


# --- Duplicates --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "processed", "duplicates"),
    [
        pytest.param([record(0, [event("x"), event("x")])], 1, 1, id="twice-in-one-envelope"),
        pytest.param([record(0, event("x")), record(1, event("x"))], 1, 1, id="twice-in-one-batch"),
        pytest.param(
            [record(0, event("x", "page_view")), record(1, event("x", "interaction", ts=H_MS + 5))],
            1,
            1,
            id="same-id-other-content-first-wins",
        ),
        pytest.param([record(i, event("x")) for i in range(5)], 1, 4, id="many-copies"),
        pytest.param(
            [record(0, event("x", campaign_id="c1")), record(1, event("x", campaign_id="c2"))],
            1,
            1,
            id="event-id-is-global-not-per-campaign",
        ),
    ],
)
def test_duplicates_within_a_batch(records: list[Record], processed: int, duplicates: int) -> None:
    delta = apply(state(), records)
    assert delta.pipeline["processed"] == processed
    assert delta.pipeline["duplicates"] == duplicates
    assert delta.seen == ["x"]
    assert sum(v for (_, name), v in delta.counters.items() if name != VISITS) == processed


def test_first_copy_wins() -> None:
    delta = apply(
        state(),
        [record(0, event("x", "page_view")), record(1, event("x", "interaction", ts=H_MS + 5))],
    )
    assert delta.counters[("c1", "page_views")] == 1
    assert delta.counters[("c1", "interactions")] == 0


def test_ids_the_store_has_seen_are_duplicates() -> None:
    delta = apply(state(), [record(0, event("old")), record(1, event("new"))], seen={"old"})
    assert delta.pipeline["duplicates"] == 1
    assert delta.pipeline["processed"] == 1
    assert delta.seen == ["new"]


async def test_duplicates_across_batches_through_the_store() -> None:
    store = MemoryStore()
    await process(store, await load_state(store), [record(0, event("x"))], NOW_S)
    delta = await process(
        store, await load_state(store), [record(1, event("x")), record(2, event("y"))], NOW_S
    )
    assert (delta.pipeline["duplicates"], delta.pipeline["processed"]) == (1, 1)
    snap = await store.read()
    assert snap.counters["c1"]["page_views"] == 2
    assert snap.pipeline["duplicates"] == 1


def test_duplicate_detection_comes_before_lateness() -> None:
    s = state()
    apply(s, [record(0, event("old", ts=H_MS, visitor_id="a"))])
    apply(s, [record(1, event("new", ts=H_MS + GAP_MS, visitor_id="b"))])  # old is now late
    delta = apply(s, [record(2, event("old", ts=H_MS, visitor_id="a"))], seen={"old"})
    assert delta.pipeline == Counter(duplicates=1)
    delta = apply(s, [record(3, event("late", ts=H_MS, visitor_id="a"))])
    assert delta.pipeline == Counter(processed=1, late=1)


# --- Lateness ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts_ms", "late"),
    [
        pytest.param(H_MS + 20 * MIN_MS - LATE_MS, False, id="exactly-allowed-lateness"),
        pytest.param(H_MS + 20 * MIN_MS - LATE_MS - 1, True, id="one-ms-too-late"),
        pytest.param(H_MS, True, id="far-behind"),
        pytest.param(H_MS + 25 * MIN_MS, False, id="ahead-of-the-watermark"),
    ],
)
def test_late_events_count_in_counters_not_in_visits(ts_ms: int, late: bool) -> None:
    s = state()
    apply(s, [record(0, event("first", ts=H_MS + 20 * MIN_MS, visitor_id="a"))])
    delta = apply(s, [record(1, event("e", "interaction", ts=ts_ms, visitor_id="b"))])
    assert delta.counters[("c1", "interactions")] == 1  # counted either way
    assert delta.pipeline["processed"] == 1
    assert delta.pipeline["late"] == int(late)
    assert delta.seen == ["e"]  # and remembered for dedup
    assert (("c1", "b") in delta.visits) is (not late)  # but only in a visit when not late
    assert len(s.visits) == (1 if late else 2)


def test_late_event_never_reaches_a_closed_visit_count() -> None:
    s = state()
    apply(s, [record(0, event("a1", ts=H_MS, visitor_id="a"))])
    apply(s, [record(1, event("b1", ts=H_MS + GAP_MS + 1, visitor_id="b"))])  # a's visit closes
    delta = apply(s, [record(2, event("a2", "interaction", ts=H_MS + 1, visitor_id="a"))])
    assert delta.pipeline["late"] == 1
    assert delta.counters[("c1", VISITS)] == 0
    closing = s.idle_advance(NOW_S + 10 * 3600)
    assert closing is not None
    assert closing.counters[("c1", VISITS)] == 1  # b's only
    assert closing.windows[(MIN_MS, H_MS + GAP_MS, "c1", INTERACTIONS)] == 0


# --- Forwarding --------------------------------------------------------------------------------


def test_unkeyed_event_of_a_visitor_of_another_partition_is_forwarded() -> None:
    home, away = visitor_on(0, 8), visitor_on(0, 8, other=True)
    obj = event("fwd", visitor_id=away, utm="kept")
    delta = apply(
        state(0, 8), [record(0, obj, key=None), record(1, event("home", visitor_id=home), key=None)]
    )
    assert delta.forwards == [Forward(away, dumps(obj))]
    assert orjson.loads(delta.forwards[0].value) == obj  # with its extra fields
    assert delta.pipeline == Counter(forwarded=1, processed=1)
    assert delta.seen == ["home"]  # counted on its own partition, not here
    assert ("c1", away) not in delta.visits


def test_record_keyed_by_its_visitor_is_home_whatever_the_hash() -> None:
    away = visitor_on(0, 8, other=True)
    delta = apply(state(0, 8), [record(0, event("e", visitor_id=away))])  # key = visitor id
    assert delta.forwards == [] and delta.pipeline["processed"] == 1


def test_envelope_keyed_by_one_visitor_forwards_the_others() -> None:
    home, away = visitor_on(0, 8), visitor_on(0, 8, other=True)
    objs = [event("1", visitor_id=home), event("2", visitor_id=away), event("3", visitor_id=home)]
    delta = apply(state(0, 8), [record(0, objs, key=home.encode())])
    assert [f.visitor_id for f in delta.forwards] == [away]
    assert sorted(delta.seen) == ["1", "3"]


def test_visit_needs_finds_the_partitions_of_the_visitors_for_apply() -> None:
    # Computed together (numpy) before apply, which then only looks the foreign ones up.
    st_ = state(0, 8)
    home, away = visitor_on(0, 8), visitor_on(0, 8, other=True)
    decoded = decode([record(0, [event("1", visitor_id=home), event("2", visitor_id=away)], None)])
    needs = st_.visit_needs(decoded, NOW_S)
    assert needs.foreign == {away}  # apply looks up only these
    delta = st_.apply(decoded, set(), NOW_S, needs)
    assert [f.visitor_id for f in delta.forwards] == [away] and delta.seen == ["1"]


def test_visitors_to_forward_are_the_same_with_needs_or_without() -> None:
    # Visitors of this partition and of others, each met twice: the same events are forwarded
    # whether apply is given visit_needs' result or finds the foreign visitors itself.
    st_ = state(0, 8)
    home, away = visitor_on(0, 8), visitor_on(0, 8, other=True)
    new_home, new_away = visitor_on(0, 8, skip=1), visitor_on(0, 8, other=True, skip=1)
    objs = [event(v, visitor_id=v) for v in (home, away, new_home, new_away, home, away)]
    decoded = decode([record(0, objs, None)])
    needs = st_.visit_needs(decoded, NOW_S)
    assert needs.foreign == {away, new_away}
    with_needs = st_.apply(decoded, set(), NOW_S, needs)
    alone = state(0, 8).apply(decoded, set(), NOW_S)
    for delta in (with_needs, alone):
        assert [f.visitor_id for f in delta.forwards] == [away, new_away, away]
        assert delta.seen == [home, new_home]  # each id's second event is a duplicate


def test_forwarded_events_are_not_deduplicated_here() -> None:
    away = visitor_on(0, 8, other=True)
    delta = apply(state(0, 8), [record(0, [event("x", visitor_id=away)] * 2, key=None)], seen={"x"})
    assert delta.pipeline == Counter(forwarded=2)  # their home partition dedups them


# --- Rejections --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ahead_ms", "rejected"),
    [
        pytest.param(0, False, id="now"),
        pytest.param(LIMITS.max_future_ms, False, id="exactly-the-future-bound"),
        pytest.param(LIMITS.max_future_ms + 1, True, id="one-ms-beyond"),
        pytest.param(86_400_000, True, id="a-day-ahead"),
    ],
)
def test_far_future_events_are_rejected(ahead_ms: int, rejected: bool) -> None:
    now_s = H_MS / 1000
    rec = record(0, event("f", ts=H_MS + ahead_ms))
    delta = apply(state(), [rec], now_s=now_s)
    assert delta.pipeline["rejected:bad_timestamp"] == int(rejected)
    assert delta.pipeline["processed"] == int(not rejected)
    if rejected:
        (dead,) = delta.dead_letters
        assert dead.record == rec
        assert dead.rejection.reason is Reason.BAD_TIMESTAMP
        assert orjson.loads(dead.rejection.raw) == event("f", ts=H_MS + ahead_ms)
        assert delta.seen == [] and delta.watermark.watermark_ms == -1  # nothing moved


def test_rejections_go_to_dead_letters_with_their_record() -> None:
    bad_envelope = record(1, [event("ok"), event("bad", type="coupon")])
    records = [record(0, b"{oops"), bad_envelope, record(2, None), record(3, b"\xff")]
    delta = apply(state(), records)
    assert [
        (d.record.offset, d.rejection.reason, d.rejection.index) for d in delta.dead_letters
    ] == [
        (0, Reason.INVALID_JSON, None),
        (1, Reason.UNKNOWN_TYPE, 1),
        (2, Reason.NOT_AN_OBJECT, None),
        (3, Reason.INVALID_UTF8, None),
    ]
    assert delta.dead_letters[1].record == bad_envelope
    assert delta.pipeline == Counter(
        {
            "processed": 1,
            "rejected:invalid_json": 1,
            "rejected:unknown_type": 1,
            "rejected:not_an_object": 1,
            "rejected:invalid_utf8": 1,
        }
    )
    assert delta.offset == 3  # bad records are consumed, never retried forever


# --- Visits, windows and distinct counts -------------------------------------------------------


def test_visit_closes_event_by_event_and_counts_in_the_bucket_of_its_start() -> None:
    start = H_MS + 7 * MIN_MS + 30_000
    delta = apply(
        state(),
        [
            record(0, event("a1", ts=start, visitor_id="a")),
            record(1, event("a2", "interaction", ts=start + 90_000, visitor_id="a")),
            record(2, event("b1", ts=start + 90_000 + GAP_MS + 1, visitor_id="b")),  # closes a
        ],
    )
    assert delta.counters[("c1", VISITS)] == 1
    assert delta.counters[("c1", BOUNCED)] == 0
    assert delta.counters[("c1", DURATION_MS)] == 90_000
    for spec in WINDOWS:
        bucket = (spec.bucket_ms, bucket_start(start, spec.bucket_ms), "c1")
        assert delta.windows[(*bucket, VISITS)] == 1
        assert delta.windows[(*bucket, INTERACTIONS)] == 1
        assert delta.windows[(*bucket, DURATION_MS)] == 90_000
        assert delta.windows[(*bucket, BOUNCED)] == 0
    assert delta.visits == {
        ("c1", "a"): None,
        ("c1", "b"): [Visit(start + 90_000 + GAP_MS + 1, start + 90_000 + GAP_MS + 1, 1, 0, 1)],
    }
    assert delta.open_visits == 1


def test_distinct_counts_hash_participants() -> None:
    pii = {"first_name": "Alice", "last_name": "Martin", "email": "alice@example.com"}
    delta = apply(
        state(),
        [
            record(0, event("p", "participation", visitor_id="a", participant=pii)),
            record(1, event("v", "page_view", visitor_id="b")),
        ],
    )
    for spec in WINDOWS:
        b = bucket_start(H_MS, spec.bucket_ms)
        assert delta.uniques[("c1", UNIQUE_VISITORS, spec.bucket_ms, b)] == {"a", "b"}
        assert delta.uniques[("c1", UNIQUE_PARTICIPATING_VISITORS, spec.bucket_ms, b)] == {"a"}
        (member,) = delta.uniques[("c1", UNIQUE_PARTICIPANTS, spec.bucket_ms, b)]
        assert len(member) == 32 and "alice" not in member.casefold()
    assert len(delta.uniques) == 3 * len(WINDOWS)


def test_a_visitor_seen_in_the_bucket_by_its_visit_is_not_added_again() -> None:
    # Two steps with a restart from the store between. In the second, the event in the same
    # minute as the visit's first adds nothing: that event added the visitor, before its
    # step's commit. The event a minute later adds it to its minute's bucket (and, from it, to
    # the coarser ones). The store's distinct counts are those of every event.
    store = MemoryStore()
    st_ = run(load_state(store))
    run(process(store, st_, [record(0, event("e0", ts=H_MS + 1_000, visitor_id="a"))], NOW_S))
    st_ = run(load_state(store))
    second = [
        record(1, event("e1", ts=H_MS + 50_000, visitor_id="a")),  # same minute: seen
        record(2, event("e2", ts=H_MS + MIN_MS, visitor_id="a")),  # next minute: not yet
    ]
    needs = st_.visit_needs(decode(second), NOW_S)
    st_.load_visits(run(store.visits(0, needs)), needs)
    delta = st_.apply(decode(second), set(), NOW_S, needs)
    finest = WINDOWS[0].bucket_ms
    assert ("c1", UNIQUE_VISITORS, finest, H_MS) not in delta.uniques
    assert delta.uniques[("c1", UNIQUE_VISITORS, finest, H_MS + MIN_MS)] == {"a"}
    run(store.add_uniques(delta.uniques))
    assert run(store.commit(delta, 0, 86_400_000))
    assert store.uniques[("c1", UNIQUE_VISITORS, finest, H_MS)] == {"a"}
    assert store.uniques[("c1", UNIQUE_VISITORS, finest, H_MS + MIN_MS)] == {"a"}


def test_a_late_event_is_counted_distinct_though_it_joins_no_visit() -> None:
    st_ = state()
    apply(st_, [record(0, event("e0", ts=H_MS + GAP_MS, visitor_id="a"))])
    late = H_MS + GAP_MS - LATE_MS - MIN_MS
    delta = apply(st_, [record(1, event("e1", ts=late, visitor_id="b"))])
    assert delta.pipeline["late"] == 1
    finest = WINDOWS[0].bucket_ms
    assert delta.uniques[("c1", UNIQUE_VISITORS, finest, bucket_start(late, finest))] == {"b"}


# --- Idle advance ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("idle_s", "closes"),
    [
        pytest.param(0, None, id="not-idle"),
        pytest.param(LIMITS.idle_advance_s - 1, None, id="not-idle-long-enough"),
        pytest.param(LIMITS.idle_advance_s, False, id="advances-but-within-the-gap"),
        pytest.param(GAP_MS / 1000 + 1, True, id="advances-past-last+gap"),
    ],
)
def test_idle_advance_closes_quiet_visits(idle_s: float, closes: bool | None) -> None:
    s = state()
    apply(s, [record(0, event("a", visitor_id="a"))], now_s=NOW_S)
    delta = s.idle_advance(NOW_S + idle_s)
    if closes is None:
        assert delta is None
        return
    assert delta is not None
    assert delta.watermark.watermark_ms == H_MS + int(idle_s * 1000)
    assert delta.watermark.newest_event_ms == H_MS
    assert delta.counters[("c1", VISITS)] == int(closes)
    assert delta.counters[("c1", BOUNCED)] == int(closes)
    assert delta.open_visits == int(not closes)
    assert delta.offset == 0 and delta.seen == [] and not delta.pipeline


def test_idle_advance_without_any_event_does_nothing() -> None:
    assert state().idle_advance(NOW_S + 10**6) is None


# --- Properties: batch-split independence, replays, order inside the lateness ------------------

SMALL = Limits(gap_ms=5 * MIN_MS, lateness_ms=2 * MIN_MS, max_future_ms=5 * MIN_MS)
SPLIT_NOW_S = H_MS / 1000 + 60 * 60  # events after H+65 min are too far in the future
ALICE = {"first_name": "Alice", "email": "alice@example.com"}
HALF_MIN_MS = 30_000


@st.composite
def records_st(draw: st.DrawFn) -> list[Record]:
    """Traffic like a partition sees it: time moving on with jitter (so some events are late,
    visits close and merge), a few visitors, repeated ids, envelopes, bad and unkeyed records."""
    records: list[Record] = []
    cursor_ms = 0
    for offset in range(draw(st.integers(0, 25))):
        cursor_ms += draw(st.integers(0, 6)) * HALF_MIN_MS

        def one(at_ms: int) -> dict[str, Any]:
            kind = draw(
                st.sampled_from(["page_view", "page_view", "interaction", "participation", "share"])
            )
            extra = (
                {"participant": ALICE} if kind == "participation" and draw(st.booleans()) else {}
            )
            return event(
                f"e{draw(st.integers(0, 60))}",  # some ids repeat
                kind,
                H_MS + max(0, at_ms + draw(st.integers(-8, 4)) * HALF_MIN_MS),
                draw(st.sampled_from(["c1", "c1", "c2"])),
                draw(st.sampled_from(["v0", "v1", "v2"])),
                **extra,
            )

        form = draw(st.sampled_from(["event", "event", "event", "envelope", "bad"]))
        value: Any
        if form == "event":
            value = one(cursor_ms)
        elif form == "envelope":
            value = [one(cursor_ms) for _ in range(draw(st.integers(0, 3)))]
        else:
            value = draw(st.sampled_from([b"{", dumps({"type": "x"}), dumps([1]), None]))
        records.append(record(offset, value, draw(st.sampled_from(["auto", "auto", None]))))
    return records


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def totals(store: MemoryStore) -> dict[str, Any]:
    """Everything the store holds that a KPI or a later batch depends on."""
    snap = await store.read()
    return {
        "counters": {c: +v for c, v in snap.counters.items()},
        "pipeline": +snap.pipeline,
        "windows": {k: (+d.sums, d.uniques) for k, d in snap.windows.items()},
        "watermarks": snap.watermarks_ms,
        "newest": snap.newest_event_ms,
        "open_visits": snap.open_visits,
        "buckets": {p: +w for p, w in store.windows.items()},
        "uniques": store.uniques,
        "offsets": {p: s.offset for p, s in store.partitions.items()},
        "visits": {p: s.visits for p, s in store.partitions.items()},
        "seen": {p: set(ids) for p, ids in store.seen_ids.items()},
    }


async def run_batches(
    batches: list[list[Record]], reload: list[bool], partitions: int, close_all: bool = True
) -> MemoryStore:
    store = MemoryStore()
    s = await load_state(store, 0, partitions, SMALL)
    for batch, fresh in zip(batches, reload, strict=False):
        if not batch:
            continue  # a worker never handles an empty batch
        if fresh:  # a restart or rebalance between batches: state from the store only
            s = await load_state(store, 0, partitions, SMALL)
        await process(store, s, batch, SPLIT_NOW_S)
    if close_all:
        s = await load_state(store, 0, partitions, SMALL)
        s.watermark.arrived(SPLIT_NOW_S)
        delta = s.idle_advance(SPLIT_NOW_S + 3600)
        if delta is not None:
            assert await store.commit(delta, s.offset, 86_400_000)
    return store


def split(records: list[Record], cuts: set[int]) -> list[list[Record]]:
    bounds = [0, *sorted(cuts), len(records)]
    return [records[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@given(records_st(), st.data(), st.sampled_from([1, 2]))
@settings(max_examples=150, deadline=None)
def test_batch_split_independence(
    records: list[Record], data: st.DataObject, partitions: int
) -> None:
    cuts = data.draw(st.sets(st.integers(1, max(1, len(records) - 1))), label="cuts")
    batches = split(records, cuts)
    reload = data.draw(st.lists(st.booleans(), min_size=len(batches), max_size=len(batches)))
    whole = run(run_batches([records], [False], partitions))
    parts = run(run_batches(batches, reload, partitions))
    assert run(totals(parts)) == run(totals(whole))


@given(records_st())
@settings(max_examples=50, deadline=None)
def test_every_item_is_accounted_for(records: list[Record]) -> None:
    snap = run(run(run_batches([records], [False], partitions=2, close_all=False)).read())
    pipeline = snap.pipeline
    items = sum(len(d.items) for d in decode(records))
    rejected = sum(v for k, v in pipeline.items() if k.startswith("rejected:"))
    assert (
        pipeline["processed"] + pipeline["duplicates"] + pipeline["forwarded"] + rejected == items
    )
    counted = sum(
        v
        for c in snap.counters.values()
        for k, v in c.items()
        if k in ("page_views", "interactions", "participations", "shares")
    )
    assert counted == pipeline["processed"]


@given(records_st(), st.data())
@settings(max_examples=100, deadline=None)
def test_crashes_and_redeliveries_count_every_event_once(
    records: list[Record], data: st.DataObject
) -> None:
    async def with_faults() -> MemoryStore:
        store = MemoryStore()
        pos, crashes = 0, 0
        while pos < len(records):
            end = data.draw(st.integers(pos + 1, len(records)), label="end")
            start = data.draw(st.integers(max(0, pos - 3), pos), label="redelivered-from")
            s = await load_state(store, 0, 2, SMALL)
            batch = records[start:end]
            if crashes < 3 and data.draw(st.booleans(), label="crash-before-commit"):
                crashes += 1
                decoded = decode(batch)
                delta = s.apply(decoded, await store.seen(0, candidate_ids(decoded)), SPLIT_NOW_S)
                await store.add_uniques(delta.uniques)  # written before the commit that never came
                continue
            await process(store, s, batch, SPLIT_NOW_S)
            pos = end
        return store

    faulty = run(with_faults())
    clean = run(run_batches([records], [False], 2, close_all=False))
    assert run(totals(faulty)) == run(totals(clean))


def test_a_stale_worker_cannot_commit() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        stale = await load_state(store)
        await process(store, await load_state(store), [record(0, event("a"))], NOW_S)
        delta = stale.apply(decode([record(0, event("a"))]), set(), NOW_S)
        assert not await store.commit(delta, -1, 86_400_000)  # fenced: offset moved meanwhile
        assert (await store.read()).counters["c1"]["page_views"] == 1

    run(scenario())


@given(
    st.lists(
        st.tuples(
            st.integers(0, SMALL.lateness_ms),
            st.sampled_from(["page_view", "interaction", "participation", "share"]),
            st.sampled_from(["v0", "v1", "v2"]),
            st.sampled_from(["c1", "c2"]),
        ),
        min_size=1,
        max_size=15,
    )
    .map(
        lambda rows: [
            event(f"e{n}", kind, H_MS + dt, c, v) for n, (dt, kind, v, c) in enumerate(rows)
        ]
    )
    .flatmap(lambda evs: st.tuples(st.just(evs), st.permutations(evs)))
)
@settings(max_examples=100, deadline=None)
def test_order_independence_inside_the_allowed_lateness(
    pair: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    # All events within the allowed lateness (< gap): none is late, no visit closes mid-way;
    # each event is its own batch, with a restart from the store in between.
    original, permuted = pair
    stores = [
        run(run_batches([[record(i, e)] for i, e in enumerate(evs)], [True] * len(evs), 1))
        for evs in (original, permuted)
    ]
    a, b = (run(totals(s)) for s in stores)
    assert a["pipeline"]["late"] == 0
    for name in ("counters", "pipeline", "windows", "buckets", "uniques", "seen", "watermarks"):
        assert a[name] == b[name], name
    assert a["open_visits"] == b["open_visits"] == 0


async def run_working_set(
    batches: list[list[Record]], partitions: int, keep: int = 0
) -> MemoryStore:
    """The worker's way: one state kept, the visits a step needs fetched, ``keep`` held over."""
    store = MemoryStore()
    state = await load_state(store, 0, partitions, SMALL)
    state.evict_visits()  # start from the store alone
    for batch in [b for b in batches if b]:
        decoded = decode(batch)
        needs = state.visit_needs(decoded, SPLIT_NOW_S)
        state.load_visits(await store.visits(0, needs), needs)
        seen = await store.seen(0, needs.ids)
        expected = state.offset
        delta = state.apply(decoded, seen, SPLIT_NOW_S)
        await store.add_uniques(delta.uniques)
        assert await store.commit(delta, expected, 86_400_000)
        state.evict_visits(keep, delta.visits)
    idle = state.idle_needs(SPLIT_NOW_S + 3600)
    if idle is not None:
        state.load_visits(await store.visits(0, idle), idle)
        delta = state.idle_advance(SPLIT_NOW_S + 3600)
        assert delta is not None
        assert await store.commit(delta, state.offset, 86_400_000)
    return store


@given(records_st(), st.data(), st.sampled_from([1, 2]), st.sampled_from([0, 1, 3, 10_000]))
@settings(max_examples=150, deadline=None)
def test_working_set_equals_everything_in_memory(
    records: list[Record], data: st.DataObject, partitions: int, keep: int
) -> None:
    # Evicting visits after a commit (beyond ``keep``, all but the last step's) and fetching
    # only the ones a step touches or may close, and does not hold, gives exactly the KPIs of
    # keeping every open visit in memory.
    cuts = data.draw(st.sets(st.integers(1, max(1, len(records) - 1))), label="cuts")
    batches = split(records, cuts)
    in_memory = run(run_batches(batches, [False] * len(batches), partitions))
    working_set = run(run_working_set(batches, partitions, keep))
    assert run(totals(working_set)) == run(totals(in_memory))


def test_visits_no_event_reaches_close_at_the_steps_last_watermark() -> None:
    # Step 1 opens visits of v0 and v1. Step 2 has only v3's events: v0's and v1's visits are
    # fetched because they may close, left untracked, and close (v0) or stay (v1) at step 2's
    # last watermark, exactly as if tracked; so does the idle advance that closes the rest.
    gap = SMALL.gap_ms
    first = [
        event("a", "page_view", H_MS, visitor_id="v0"),
        event("b", "interaction", H_MS + 3 * MIN_MS, visitor_id="v1"),
    ]
    second = [event("c", "page_view", H_MS + gap + 1, visitor_id="v3")]
    batches = [[record(0, dumps(first))], [record(1, dumps(second))]]
    working_set = run(run_working_set(batches, 1))
    in_memory = run(run_batches(batches, [False, False], 1))
    assert run(totals(working_set)) == run(totals(in_memory))

    async def second_step() -> tuple[Delta, PartitionState]:
        store = MemoryStore()
        state = await load_state(store, 0, 1, SMALL)
        await process(store, state, batches[0], SPLIT_NOW_S)
        state.evict_visits()
        decoded = decode(batches[1])
        needs = state.visit_needs(decoded, SPLIT_NOW_S)
        state.load_visits(await store.visits(0, needs), needs)
        assert len(state.visits) == 0  # v3's visit is new; v0's and v1's are not tracked
        return state.apply(decoded, set(), SPLIT_NOW_S, needs), state

    delta, after = run(second_step())
    assert delta.visits.keys() == {("c1", "v0"), ("c1", "v3")}  # v1's stays as stored
    assert delta.visits[("c1", "v0")] is None
    assert delta.counters[("c1", VISITS)] == 1 and delta.counters[("c1", BOUNCED)] == 1
    assert after.open_visits == 2  # v1, v3


def test_visits_loaded_for_a_step_that_never_applied_are_not_closed_later() -> None:
    # A step that loads visits and then does nothing (an idle advance that finds nothing to
    # move) leaves no untracked visit behind for the next step to close a second time.
    state = PartitionState(0, 1, SMALL, KEY)
    stale = VisitNeeds([], H_MS, touched=())
    state.load_visits({("c1", "v0"): [Visit(H_MS, H_MS, 1, 0, 1)]}, stale)
    state.load_visits({}, stale)
    delta = state.apply(decode([record(0, event("x", ts=H_MS + 60 * MIN_MS))]), set(), SPLIT_NOW_S)
    assert delta.counters[("c1", VISITS)] == 0
