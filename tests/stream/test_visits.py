"""Tests of :mod:`stream.visits`: event-time visits of one ``(campaign, visitor)``."""

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.events import EventType
from stream.visits import (
    ClosedVisit,
    Visit,
    VisitTracker,
    decode_key,
    decode_many,
    decode_visits,
    encode_key,
    encode_many,
    encode_visits,
)

GAP = 1_000
PV, IA, PA, SH = (
    EventType.PAGE_VIEW,
    EventType.INTERACTION,
    EventType.PARTICIPATION,
    EventType.SHARE,
)
NEVER = 10**15  # a watermark past every deadline
BUCKET = 250  # for "seen in the bucket" (less than the gap: a visit spans several)


def tracker_with(events: list[tuple[int, EventType]], key: str = "v") -> VisitTracker:
    tracker = VisitTracker(GAP)
    for ts, kind in events:
        tracker.add("c", key, ts, kind, 1)
    return tracker


def shape(visits: list[ClosedVisit] | list[Visit]) -> list[list[int]]:
    return sorted(v[1].pack() if isinstance(v, tuple) else v.pack() for v in visits)


def reference_visits(timestamps: list[int], gap: int) -> list[tuple[int, int, int]]:
    """``(first, last, events)`` by the definition: sorted times split where apart > gap."""
    out: list[tuple[int, int, int]] = []
    for ts in sorted(timestamps):
        if out and ts - out[-1][1] <= gap:
            first, _, n = out[-1]
            out[-1] = (first, ts, n + 1)
        else:
            out.append((ts, ts, 1))
    return out


# --- Table: how events group into visits -------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "visits"),
    [
        # [first, last, page_views, interactions, events] of each visit, oldest first.
        pytest.param([(0, PV)], [[0, 0, 1, 0, 1]], id="one-event"),
        pytest.param([(0, PV), (GAP, IA)], [[0, GAP, 1, 1, 2]], id="exactly-gap-apart-joins"),
        pytest.param(
            [(0, PV), (GAP + 1, PV)],
            [[0, 0, 1, 0, 1], [GAP + 1, GAP + 1, 1, 0, 1]],
            id="gap+1-splits",
        ),
        pytest.param([(500, PV), (0, IA)], [[0, 500, 1, 1, 2]], id="out-of-order-inside-gap"),
        pytest.param([(0, PV), (-GAP, SH)], [[-GAP, 0, 1, 0, 2]], id="older-by-exactly-gap-joins"),
        pytest.param(
            [(0, PV), (2 * GAP, PV), (GAP, IA)],
            [[0, 2 * GAP, 2, 1, 3]],
            id="bridging-event-merges-two-visits",
        ),
        pytest.param(
            [(0, PV), (3 * GAP, PV), (2 * GAP + GAP // 2, IA)],
            [[0, 0, 1, 0, 1], [2 * GAP + GAP // 2, 3 * GAP, 1, 1, 2]],
            id="near-second-only",
        ),
        pytest.param(
            [(0, PV), (2 * GAP, PV), (4 * GAP, PV), (GAP, IA), (3 * GAP, PA)],
            [[0, 4 * GAP, 3, 1, 5]],
            id="two-bridges-merge-three",
        ),
        pytest.param([(100, PV), (100, PV)], [[100, 100, 2, 0, 2]], id="same-time-twice"),
    ],
)
def test_grouping(events: list[tuple[int, EventType]], visits: list[list[int]]) -> None:
    tracker = tracker_with(events)
    assert [v.pack() for v in tracker.get(("c", "v")) or []] == visits
    assert len(tracker) == len(visits)
    assert shape(tracker.close_until(NEVER)) == sorted(visits)
    assert len(tracker) == 0 and tracker.get(("c", "v")) is None


def test_keys_are_independent() -> None:
    tracker = VisitTracker(GAP)
    tracker.add("c", "a", 0, PV, 1)
    tracker.add("c", "b", 10, PV, 1)  # other visitor: its own visit
    tracker.add("d", "a", 20, PV, 1)  # other campaign: its own visit
    assert len(tracker) == 3
    closed = tracker.close_until(NEVER)
    assert sorted(campaign for campaign, _ in closed) == ["c", "c", "d"]


# --- Table: closing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("watermark_ms", "closes"),
    [
        pytest.param(500 + GAP - 1, False, id="before-last+gap"),
        pytest.param(500 + GAP, False, id="at-last+gap-stays-open"),
        pytest.param(500 + GAP + 1, True, id="strictly-after-closes"),
    ],
)
def test_closes_strictly_after_last_plus_gap(watermark_ms: int, closes: bool) -> None:
    tracker = tracker_with([(0, PV), (500, IA)])
    closed = tracker.close_until(watermark_ms)
    assert bool(closed) is closes
    assert len(tracker) == (0 if closes else 1)


def test_extended_visit_closes_on_its_new_deadline_only() -> None:
    tracker = tracker_with([(0, PV)])
    tracker.add("c", "v", 800, IA, 1)  # extends the deadline from 1000 to 1800
    assert tracker.close_until(GAP + 1) == []  # the old deadline is stale
    (closed,) = tracker.close_until(800 + GAP + 1)
    assert closed == ("c", Visit(0, 800, 1, 1, 2))


def test_close_picks_the_right_visit_of_a_key() -> None:
    tracker = tracker_with([(0, PV), (5 * GAP, IA)])
    ((_, closed),) = tracker.close_until(2 * GAP)
    assert closed.first_ms == 0
    assert [v.first_ms for v in tracker.get(("c", "v")) or []] == [5 * GAP]


# --- Table: bounce and duration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "bounced", "duration_ms"),
    [
        pytest.param([(0, PV)], True, 0, id="one-page-view-is-a-bounce-of-0s"),
        pytest.param([(0, IA)], False, 0, id="one-interaction"),
        pytest.param([(0, PA)], False, 0, id="one-participation"),
        pytest.param([(0, SH)], False, 0, id="one-share"),
        pytest.param([(0, PV), (0, PV)], False, 0, id="two-page-views-same-ms"),
        pytest.param([(0, PV), (300, PV)], False, 300, id="two-page-views"),
        pytest.param([(0, PV), (200, IA)], False, 200, id="view-then-interaction"),
        pytest.param([(900, IA), (100, PV), (400, SH)], False, 800, id="duration-last-minus-first"),
    ],
)
def test_bounce_and_duration(
    events: list[tuple[int, EventType]], bounced: bool, duration_ms: int
) -> None:
    ((_, closed),) = tracker_with(events).close_until(NEVER)
    assert closed.bounced is bounced
    assert closed.duration_ms == duration_ms


# --- Store round trip and dirty tracking --------------------------------------------------------


def test_pack_is_plain_json_integers() -> None:
    (visit,) = tracker_with([(7, PV)]).get(("c", "v")) or []
    packed = visit.pack()
    assert all(type(x) is int for x in packed)  # no bools: stored as JSON numbers
    assert orjson.dumps(packed) == b"[7,7,1,0,1]"
    assert Visit.unpack(orjson.loads(orjson.dumps(packed))) == visit


@pytest.mark.parametrize(
    ("visits", "text"),
    [
        # first,last,page_views,interactions,events per visit (JSON arrays without the list's
        # brackets); the earliest last first.
        pytest.param([Visit(7, 7, 1, 0, 1)], "7,7,1,0,1", id="a bounce"),
        pytest.param([Visit(100, 2500, 2, 3, 6)], "100,2500,2,3,6", id="a long visit"),
        pytest.param(
            [Visit(10_000, 10_000, 1, 0, 1), Visit(0, 400, 1, 1, 2)],
            "0,400,1,1,2],[10000,10000,1,0,1",
            id="two, by last event time",
        ),
        pytest.param(
            [Visit(0, 9000, 1, 0, 1), Visit(5000, 6000, 1, 0, 1)],
            "5000,6000,1,0,1],[0,9000,1,0,1",
            id="the later-starting one ends first",
        ),
    ],
)
def test_stored_texts_second_number_is_the_earliest_last_event_time(
    visits: list[Visit], text: str
) -> None:
    assert encode_visits(visits) == text
    assert sorted(decode_visits(text), key=lambda v: v.first_ms) == sorted(
        visits, key=lambda v: v.first_ms
    )
    assert int(text.split(",")[1]) == min(v.last_ms for v in visits)


_VISIT = st.builds(
    lambda first, length, page_views, interactions, extra: Visit(
        first, first + length, page_views, interactions, page_views + interactions + extra
    ),
    st.integers(0, 2**53),
    st.integers(0, 10**9),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_VISIT, min_size=1, max_size=4), max_size=8))
def test_many_at_once_as_one_by_one(keys: list[list[Visit]]) -> None:
    texts = encode_many(keys)
    assert texts == [encode_visits(visits) for visits in keys]
    decoded = decode_many([text.encode() for text in texts])
    assert decoded == [decode_visits(text) for text in texts]
    for visits, text in zip(decoded, texts, strict=True):  # the first read is the due time
        assert visits[0].last_ms == int(text.split(",")[1]) == min(v.last_ms for v in visits)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_visit_keys_round_trip(campaign: str, visitor: str) -> None:
    assert decode_key(encode_key((campaign, visitor))) == (campaign, visitor)


def test_load_restores_open_visits_and_their_deadlines() -> None:
    tracker = VisitTracker(GAP)
    tracker.load(("c", "v"), [Visit(5000, 5000, 1, 0, 1), Visit(0, 100, 1, 1, 2)])
    assert len(tracker) == 2
    assert [v.first_ms for v in tracker.get(("c", "v")) or []] == [0, 5000]  # sorted
    assert tracker.take_dirty() == {}  # loading is not a change
    tracker.add("c", "v", 150, IA, 1)  # joins the loaded visit
    assert [v.pack() for v in tracker.get(("c", "v")) or []] == [
        [0, 150, 1, 2, 3],
        [5000, 5000, 1, 0, 1],
    ]
    assert shape(tracker.close_until(150 + GAP + 1)) == [[0, 150, 1, 2, 3]]
    assert shape(tracker.close_until(NEVER)) == [[5000, 5000, 1, 0, 1]]


def test_take_dirty_reports_changes_once() -> None:
    tracker = tracker_with([(0, PV)], key="a")
    tracker.add("c", "b", 0, PV, 1)
    assert tracker.take_dirty() == {
        ("c", "a"): [Visit(0, 0, 1, 0, 1)],
        ("c", "b"): [Visit(0, 0, 1, 0, 1)],
    }
    assert tracker.take_dirty() == {}
    tracker.close_until(NEVER)
    assert tracker.take_dirty() == {("c", "a"): None, ("c", "b"): None}  # none left


def test_stale_deadlines_are_compacted_without_losing_visits() -> None:
    tracker = VisitTracker(GAP)
    for ts in range(0, 5000 * 10, 10):  # one long visit, extended 5000 times
        tracker.add("c", "v", ts, IA, 1)
    tracker.add("c", "w", 0, PV, 1)
    assert tracker.close_until(GAP + 1) == [("c", Visit(0, 0, 1, 0, 1))]
    assert len(tracker._deadlines) <= 2 * len(tracker) + 1024  # compacted
    ((_, closed),) = tracker.close_until(NEVER)
    assert closed.events == 5000


# --- Properties --------------------------------------------------------------------------------

kinds = st.sampled_from([PV, IA, PA, SH])
timed = st.lists(st.tuples(st.integers(0, 8 * GAP), kinds), min_size=1, max_size=25)


@given(timed.flatmap(lambda evs: st.tuples(st.just(evs), st.permutations(evs))))
@settings(max_examples=200, deadline=None)
def test_order_independence_inside_the_gap(
    pair: tuple[list[tuple[int, EventType]], list[tuple[int, EventType]]],
) -> None:
    # Fed directly, with close_until only at the end: no event is ever late here.
    events, permuted = pair
    a = tracker_with(events).close_until(NEVER)
    b = tracker_with(permuted).close_until(NEVER)
    assert shape(a) == shape(b)


@given(timed)
@settings(max_examples=200, deadline=None)
def test_visits_match_the_definition(events: list[tuple[int, EventType]]) -> None:
    closed = tracker_with(events).close_until(NEVER)
    got = sorted((v.first_ms, v.last_ms, v.events) for _, v in closed)
    assert got == reference_visits([ts for ts, _ in events], GAP)
    for _, v in closed:
        assert v.duration_ms == v.last_ms - v.first_ms >= 0
        assert v.bounced == (v.events == 1 and v.page_views == 1)


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"), st.sampled_from(["a", "b", "c"]), st.integers(0, 20 * GAP), kinds
        ),
        st.tuples(st.just("close"), st.just(""), st.integers(0, 3 * GAP), st.just(PV)),
    ),
    max_size=60,
)


@given(ops)
@settings(max_examples=200, deadline=None)
def test_no_event_lost_and_open_visits_stay_apart(
    steps: list[tuple[str, str, int, EventType]],
) -> None:
    tracker = VisitTracker(GAP)
    added = 0
    closed: list[ClosedVisit] = []
    watermark = 0
    buckets: dict[str, set[int]] = {}  # per visitor, the buckets of its events added
    for op, visitor, value, kind in steps:
        if op == "add":
            if tracker.add("c", visitor, value, kind, BUCKET):
                # "seen in the bucket" only when one of the visitor's events was
                assert value // BUCKET in buckets[visitor]
            buckets.setdefault(visitor, set()).add(value // BUCKET)
            added += 1
        else:
            watermark += value
            for c in tracker.close_until(watermark):
                assert c[1].last_ms + GAP < watermark  # closed strictly after last + gap
                closed.append(c)
        open_visits = [v for key in "abc" for v in tracker.get(("c", key)) or []]
        assert len(tracker) == len(open_visits)
        assert sum(v.events for v in open_visits) + sum(v.events for _, v in closed) == added
        for key in "abc":
            vs = tracker.get(("c", key)) or []
            assert all(b.first_ms - a.last_ms > GAP for a, b in itertools.pairwise(vs))
    closed += tracker.close_until(NEVER)
    assert sum(v.events for _, v in closed) == added
    assert len(tracker) == 0


def test_add_says_whether_the_visit_had_an_event_in_the_bucket() -> None:
    tracker = VisitTracker(GAP)
    assert not tracker.add("c", "v", 1_050, PV, 100)  # a new visit: not known
    assert tracker.add("c", "v", 1_099, IA, 100)  # its first (and last) event's bucket
    assert not tracker.add("c", "v", 1_100, IA, 100)  # the next bucket: not seen there yet
    assert tracker.add("c", "v", 1_000, IA, 100)  # its first event's bucket (first moves back)
    assert not tracker.add("c", "v", 1_450, IA, 100)  # between: [1100, 1199] was, not [1400,)
    tracker.close_until(NEVER)
    assert not tracker.add("c", "v", 1_460, PV, 100)  # its visit closed: a new one
