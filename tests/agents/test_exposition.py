"""Tests of :mod:`agents.exposition`: byte for byte what prometheus_client writes."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from agents.exposition import Family, Row, render


class _Families(Collector):
    def __init__(self, families: Sequence[Family]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.metric()


def reference(families: Sequence[Family]) -> str:
    """What ``generate_latest`` writes for ``families``."""
    registry = CollectorRegistry()
    registry.register(_Families(families))
    return generate_latest(registry).decode()


# Values where formatting has a special case: signed zeros, infinities, NaN, Go's exponent
# switch (7 or more integer digits), integers, repeated values (formatted once, reused).
EDGE_VALUES = [0, 0.0, -0.0, 0.0, 1, 1.0, -1.5, 0.1, 1 / 3, 999_999.0, 1_000_000.0, 1234567.0]
EDGE_VALUES += [1e16, 1e-7, -1e22, math.inf, -math.inf, math.nan, 2**60, 12.0, 12]
# Label values needing escapes, non-ASCII, empty, and a value repeated (escaped once, reused).
EDGE_LABELS = ["plain", 'quo"te', "back\\slash", "new\nline", 'all\\"\n', "", "café ☕", "plain"]


def test_edge_values_and_label_values() -> None:
    rows: list[Row] = [((label,), value) for label in EDGE_LABELS for value in EDGE_VALUES]
    families = [
        Family("x_values", "Help with a \\ backslash\nand a newline.", "gauge", ("l",), rows),
        Family("x_count", "A counter.", "counter", ("l",), rows),
        Family("x_plain", "No labels.", "counter", (), [((), v) for v in EDGE_VALUES]),
        Family("x_empty", "No samples at all.", "gauge", ("a", "b"), []),
    ]
    assert render(families) == reference(families)


def test_labels_are_sorted_by_name_whatever_their_order() -> None:
    rows: list[Row] = [(("3", "1", "2"), 1.0), (("c", "a", 'b"'), 2.5)]
    families = [
        Family("x_three", "Three labels.", "gauge", ("zeta", "alpha", "mu"), rows),
        Family("x_two", "Two, reversed.", "gauge", ("window", "campaign"), [(("5m", "c1"), 1)]),
    ]
    assert render(families) == reference(families)


@given(
    st.lists(
        st.tuples(
            st.text(max_size=12),
            st.text(max_size=12),
            st.one_of(st.integers(-(2**63), 2**63), st.floats()),
        ),
        max_size=30,
    ),
    st.sampled_from([("campaign", "window"), ("window", "campaign")]),
)
def test_any_labels_and_values(
    samples: list[tuple[str, str, float]], labels: tuple[str, str]
) -> None:
    rows: list[Row] = [((a, b), value) for a, b, value in samples]
    families = [Family("x_any", "Any.", "gauge", labels, rows)]
    assert render(families) == reference(families)
