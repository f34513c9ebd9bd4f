"""Tests of :mod:`stream.aggregators`: small mergeable KPI states."""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.aggregators import BoundedRatio, Mean, Ratio, Sum

# Counts and millisecond sums are integers: merges are then exact, not float-rounded.
counts = st.integers(min_value=0, max_value=10**12)

sums = st.builds(Sum, counts)
ratios = st.builds(Ratio, counts, counts)
bounded = st.builds(BoundedRatio, counts, counts)
means = st.builds(Mean, counts, counts)
aggregators = st.one_of(
    st.tuples(sums, sums, sums),
    st.tuples(ratios, ratios, ratios),
    st.tuples(bounded, bounded, bounded),
    st.tuples(means, means, means),
)


@given(aggregators)
@settings(max_examples=300, deadline=None)
def test_merge_is_associative(abc: tuple[Any, Any, Any]) -> None:
    a, b, c = abc
    assert a.merge(b).merge(c) == a.merge(b.merge(c))


@given(aggregators)
@settings(max_examples=300, deadline=None)
def test_merge_is_commutative_and_keeps_the_kind(abc: tuple[Any, Any, Any]) -> None:
    a, b, _ = abc
    assert a.merge(b) == b.merge(a)
    assert type(a.merge(b)) is type(a)
    assert a.merge(b).result() == b.merge(a).result()


@given(aggregators)
@settings(max_examples=200, deadline=None)
def test_merge_does_not_mutate_its_operands(abc: tuple[Any, Any, Any]) -> None:
    a, b, _ = abc
    before = (repr(a), repr(b))
    a.merge(b)
    assert (repr(a), repr(b)) == before


@given(st.lists(st.tuples(counts, counts), max_size=20), st.integers(min_value=0, max_value=20))
@settings(max_examples=200, deadline=None)
def test_merging_parts_equals_adding_everything(values: list[tuple[int, int]], cut: int) -> None:
    def ratio_of(part: list[tuple[int, int]]) -> Ratio:
        r = Ratio()
        for num, den in part:
            r.add(num, den)
        return r

    whole = ratio_of(values)
    assert ratio_of(values[:cut]).merge(ratio_of(values[cut:])) == whole

    def mean_of(part: list[tuple[int, int]]) -> Mean:
        m = Mean()
        for value, _ in part:
            m.add(value)
        return m

    assert mean_of(values[:cut]).merge(mean_of(values[cut:])) == mean_of(values)
    parts = [Sum(v) for v, _ in values]
    assert reduce(Sum.merge, parts, Sum()).result() == sum(v for v, _ in values)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        # Empty denominators are undefined: the KPI is not exported, never NaN.
        pytest.param(lambda: Ratio(), None, id="empty-ratio"),
        pytest.param(lambda: Ratio(5, 0), None, id="ratio-zero-denominator"),
        pytest.param(lambda: BoundedRatio(3, 0), None, id="bounded-zero-denominator"),
        pytest.param(lambda: Mean(), None, id="empty-mean"),
        pytest.param(lambda: Mean(10, 0), None, id="mean-zero-count"),
        # A sum is always defined.
        pytest.param(lambda: Sum(), 0, id="empty-sum"),
        pytest.param(lambda: Sum(7), 7, id="sum"),
        # Defined values.
        pytest.param(lambda: Ratio(1, 4), 0.25, id="ratio"),
        pytest.param(lambda: Ratio(0, 4), 0.0, id="ratio-zero-numerator"),
        pytest.param(lambda: Ratio(6, 4), 1.5, id="ratio-above-one-is-not-clamped"),
        pytest.param(lambda: Mean(610, 4), 152.5, id="mean"),
        # BoundedRatio clamps estimates (HyperLogLog part over whole) to 1.
        pytest.param(lambda: BoundedRatio(2, 5), 0.4, id="bounded-below-one"),
        pytest.param(lambda: BoundedRatio(5, 5), 1.0, id="bounded-at-one"),
        pytest.param(lambda: BoundedRatio(102, 100), 1.0, id="bounded-clamped"),
    ],
)
def test_result(make: Callable[[], Any], expected: float | None) -> None:
    assert make().result() == expected


@pytest.mark.parametrize(
    ("make", "add", "expected"),
    [
        pytest.param(Sum, lambda a: (a.add(2), a.add(3)), 5, id="sum"),
        pytest.param(Ratio, lambda a: (a.add(1, 1), a.add(0, 1)), 0.5, id="ratio"),
        pytest.param(Mean, lambda a: (a.add(3), a.add(6, 2)), 3.0, id="weighted-mean"),
        pytest.param(BoundedRatio, lambda a: (a.add(3, 1), a.add(0, 1)), 1.0, id="bounded"),
    ],
)
def test_add(make: Callable[[], Any], add: Callable[[Any], object], expected: float) -> None:
    agg = make()
    add(agg)
    assert agg.result() == expected


@given(counts, counts)
@settings(max_examples=200, deadline=None)
def test_bounded_ratio_is_within_zero_and_one(num: int, den: int) -> None:
    value = BoundedRatio(num, den).result()
    if den == 0:
        assert value is None
    else:
        assert value is not None and 0.0 <= value <= 1.0
    merged = BoundedRatio(num, den).merge(Ratio(num, den))
    assert isinstance(merged, BoundedRatio)
    assert merged.result() == value
