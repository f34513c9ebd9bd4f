"""Tests of :mod:`stream.watermark`: event-time progress with idle advance on the wall clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.watermark import Watermark


def test_starts_before_any_event() -> None:
    wm = Watermark()
    assert (wm.watermark_ms, wm.newest_event_ms, wm.anchor_ms) == (-1, -1, -1)
    assert not wm.is_late(0, lateness_ms=0)  # nothing is late before the first event
    assert not wm.idle_advance(now_s=10**9, idle_s=60)  # and nothing to advance from


@pytest.mark.parametrize(
    ("observed", "watermark_ms"),
    [
        pytest.param([5], 5, id="first-event"),
        pytest.param([5, 9, 7], 9, id="newest-wins"),
        pytest.param([9, 1, 2, 3], 9, id="older-events-never-move-it-back"),
        pytest.param([0], 0, id="epoch"),
    ],
)
def test_observe(observed: list[int], watermark_ms: int) -> None:
    wm = Watermark()
    for ts in observed:
        wm.observe(ts)
    assert wm.watermark_ms == wm.newest_event_ms == watermark_ms


@pytest.mark.parametrize(
    ("ts_ms", "late"),
    [
        pytest.param(10_000, False, id="at-the-watermark"),
        pytest.param(12_000, False, id="ahead"),
        pytest.param(4_000, False, id="exactly-at-the-lateness-bound"),
        pytest.param(3_999, True, id="one-ms-beyond-the-bound"),
        pytest.param(0, True, id="far-behind"),
    ],
)
def test_is_late(ts_ms: int, late: bool) -> None:
    wm = Watermark()
    wm.observe(10_000)
    assert wm.is_late(ts_ms, lateness_ms=6_000) is late


@pytest.mark.parametrize(
    ("idle_for_s", "moved", "watermark_ms"),
    [
        pytest.param(0, False, 10_000, id="just-arrived"),
        pytest.param(59.999, False, 10_000, id="just-before-idle"),
        pytest.param(60, True, 70_000, id="idle-exactly"),
        pytest.param(90.5, True, 100_500, id="follows-the-clock"),
    ],
)
def test_idle_advance(idle_for_s: float, moved: bool, watermark_ms: int) -> None:
    wm = Watermark()
    wm.observe(10_000)
    wm.arrived(now_s=1_000.0)
    assert wm.idle_advance(1_000.0 + idle_for_s, idle_s=60) is moved
    assert wm.watermark_ms == watermark_ms
    assert wm.newest_event_ms == 10_000  # idle advance is not an event


def test_idle_advance_counts_from_the_last_arrival_not_cumulatively() -> None:
    wm = Watermark()
    wm.observe(10_000)
    wm.arrived(now_s=0.0)
    assert wm.idle_advance(100.0, idle_s=60)
    assert wm.watermark_ms == 110_000
    assert not wm.idle_advance(100.0, idle_s=60)  # same time again: no double advance
    assert wm.idle_advance(130.0, idle_s=60)
    assert wm.watermark_ms == 140_000
    wm.arrived(now_s=130.0)  # a record arrives: the idle clock restarts from here
    assert not wm.idle_advance(150.0, idle_s=60)
    assert wm.idle_advance(190.0, idle_s=60)
    assert wm.watermark_ms == 200_000


def test_idle_advance_never_moves_back() -> None:
    wm = Watermark()
    wm.observe(10_000)
    wm.arrived(now_s=0.0)
    wm.observe(500_000)  # events newer than anchor + idle time arrive meanwhile
    assert not wm.idle_advance(100.0, idle_s=60)
    assert wm.watermark_ms == 500_000


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("observe"), st.integers(0, 10**7)),
            st.tuples(st.just("arrive"), st.integers(0, 10**4)),
            st.tuples(st.just("idle"), st.integers(0, 10**4)),
        ),
        max_size=30,
    )
)
@settings(max_examples=150, deadline=None)
def test_watermark_never_decreases(steps: list[tuple[str, int]]) -> None:
    wm = Watermark()
    now_s = 0
    previous = wm.watermark_ms
    for op, value in steps:
        if op == "observe":
            wm.observe(value)
        elif op == "arrive":
            now_s += value
            wm.arrived(now_s)
        else:
            now_s += value
            wm.idle_advance(now_s, idle_s=60)
        assert wm.watermark_ms >= previous
        assert wm.watermark_ms >= wm.newest_event_ms
        previous = wm.watermark_ms
