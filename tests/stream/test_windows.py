"""Tests of :mod:`stream.windows`: aligned buckets and the buckets that make a window."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.windows import RETENTION_MS, WINDOWS, WindowSpec, bucket_start, window_bucket_starts
from tests.stream.factories import H_MS, MIN_MS

HOUR_MS = 60 * MIN_MS


@pytest.mark.parametrize(
    ("label", "length_ms", "bucket_ms", "buckets"),
    [
        pytest.param("5m", 5 * MIN_MS, MIN_MS, 5, id="5m-of-1-minute-buckets"),
        pytest.param("1h", HOUR_MS, 5 * MIN_MS, 12, id="1h-of-5-minute-buckets"),
        pytest.param("24h", 24 * HOUR_MS, HOUR_MS, 24, id="24h-of-1-hour-buckets"),
    ],
)
def test_window_catalog(label: str, length_ms: int, bucket_ms: int, buckets: int) -> None:
    spec = {w.label: w for w in WINDOWS}[label]
    assert spec == WindowSpec(label, length_ms, bucket_ms)
    assert spec.buckets == buckets
    assert spec.length_ms % spec.bucket_ms == 0


def test_retention_covers_the_longest_window_and_its_partial_bucket() -> None:
    assert RETENTION_MS == 25 * HOUR_MS


@pytest.mark.parametrize(
    ("ts_ms", "bucket_ms", "start"),
    [
        pytest.param(0, MIN_MS, 0, id="epoch"),
        pytest.param(MIN_MS - 1, MIN_MS, 0, id="last-ms-of-first-bucket"),
        pytest.param(MIN_MS, MIN_MS, MIN_MS, id="first-ms-of-second-bucket"),
        pytest.param(H_MS, HOUR_MS, H_MS, id="aligned-hour"),
        pytest.param(H_MS + 59 * MIN_MS, HOUR_MS, H_MS, id="inside-hour"),
        pytest.param(H_MS + 7 * MIN_MS + 1, 5 * MIN_MS, H_MS + 5 * MIN_MS, id="five-minute"),
    ],
)
def test_bucket_start(ts_ms: int, bucket_ms: int, start: int) -> None:
    assert bucket_start(ts_ms, bucket_ms) == start


@pytest.mark.parametrize(
    ("end_ms", "label", "starts"),
    [
        # The newest bucket holds the end, even at its first millisecond (partial bucket).
        pytest.param(
            H_MS, "5m", [H_MS + i * MIN_MS for i in range(-4, 1)], id="5m-at-bucket-start"
        ),
        pytest.param(
            H_MS + MIN_MS - 1,
            "5m",
            [H_MS + i * MIN_MS for i in range(-4, 1)],
            id="5m-at-bucket-end",
        ),
        pytest.param(
            H_MS + 50 * MIN_MS,
            "1h",
            [H_MS + (50 + 5 * i) * MIN_MS for i in range(-11, 1)],
            id="1h",
        ),
        pytest.param(
            H_MS + 30 * MIN_MS,
            "24h",
            [H_MS + i * HOUR_MS for i in range(-23, 1)],
            id="24h",
        ),
    ],
)
def test_window_bucket_starts(end_ms: int, label: str, starts: list[int]) -> None:
    spec = {w.label: w for w in WINDOWS}[label]
    assert window_bucket_starts(end_ms, spec) == starts


@given(st.integers(min_value=0, max_value=2**45), st.sampled_from(WINDOWS))
@settings(max_examples=300, deadline=None)
def test_window_buckets_are_aligned_consecutive_and_hold_the_end(
    end_ms: int, spec: WindowSpec
) -> None:
    starts = window_bucket_starts(end_ms, spec)
    assert len(starts) == spec.buckets
    assert all(s % spec.bucket_ms == 0 for s in starts)
    assert all(b - a == spec.bucket_ms for a, b in itertools.pairwise(starts))
    assert starts[-1] <= end_ms < starts[-1] + spec.bucket_ms  # newest bucket holds the end
    assert end_ms - spec.length_ms < starts[0]  # never older than the window's length
    assert end_ms - starts[0] < RETENTION_MS  # and always within retention


@given(st.integers(min_value=0, max_value=2**45), st.sampled_from(WINDOWS))
@settings(max_examples=300, deadline=None)
def test_bucket_start_holds_its_timestamp(ts_ms: int, spec: WindowSpec) -> None:
    start = bucket_start(ts_ms, spec.bucket_ms)
    assert start <= ts_ms < start + spec.bucket_ms
    assert start % spec.bucket_ms == 0
