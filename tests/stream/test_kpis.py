"""Tests of :mod:`stream.kpis`: the KPI catalog and the window gauges' values."""

from __future__ import annotations

from collections import Counter

import pytest

from stream.kpis import COUNTERS, WINDOW_KPIS, KpiSnapshot, WindowData
from stream.partition import (
    BOUNCED,
    DURATION_MS,
    EVENT_COUNTERS,
    INTERACTIONS,
    UNIQUE_PARTICIPANTS,
    UNIQUE_PARTICIPATING_VISITORS,
    UNIQUE_VISITORS,
    VISITS,
)
from tests.stream.factories import run_scenario

RATIOS = {"kpi_bounce_ratio", "kpi_interactions_per_visit", "kpi_average_visit_duration_seconds"}


def test_counter_catalog_is_the_contract() -> None:
    assert [c.name + "_total" for c in COUNTERS] == [
        "kpi_page_views_total",
        "kpi_interactions_total",
        "kpi_participations_total",
        "kpi_shares_total",
        "kpi_visits_total",
        "kpi_bounced_visits_total",
        "kpi_visit_duration_seconds_total",
    ]
    stored = {c.counter for c in COUNTERS}
    assert set(EVENT_COUNTERS.values()) | {VISITS, BOUNCED, DURATION_MS} == stored
    assert {c.name: c.scale for c in COUNTERS}["kpi_visit_duration_seconds"] == 0.001  # ms -> s


def test_window_catalog_is_the_contract() -> None:
    assert [k.name for k in WINDOW_KPIS] == [
        "kpi_bounce_ratio",
        "kpi_interactions_per_visit",
        "kpi_participation_ratio",
        "kpi_average_visit_duration_seconds",
        "kpi_unique_visitors",
        "kpi_unique_participants",
    ]


def values(snap: KpiSnapshot) -> dict[tuple[str, str, str], float]:
    return {(k.name, campaign, label): v for k, campaign, label, v in snap.window_values()}


@pytest.mark.parametrize(
    ("sums", "uniques", "expected"),
    [
        # No visit closed: the ratios over visits are absent, never NaN or 0.
        pytest.param(
            {},
            {UNIQUE_VISITORS: 3},
            {
                "kpi_participation_ratio": 0.0,
                "kpi_unique_visitors": 3,
                "kpi_unique_participants": 0,
            },
            id="no-closed-visit",
        ),
        # Nothing at all: only the distinct counts, at 0.
        pytest.param(
            {}, {}, {"kpi_unique_visitors": 0, "kpi_unique_participants": 0}, id="empty-window"
        ),
        pytest.param(
            {VISITS: 4, BOUNCED: 1, INTERACTIONS: 2, DURATION_MS: 610_000},
            {UNIQUE_VISITORS: 5, UNIQUE_PARTICIPATING_VISITORS: 2, UNIQUE_PARTICIPANTS: 1},
            {
                "kpi_bounce_ratio": 0.25,
                "kpi_interactions_per_visit": 0.5,
                "kpi_participation_ratio": 0.4,
                "kpi_average_visit_duration_seconds": 152.5,
                "kpi_unique_visitors": 5,
                "kpi_unique_participants": 1,
            },
            id="full-window",
        ),
        # HyperLogLog estimates may say more participants than visitors: clamped to 1.
        pytest.param(
            {VISITS: 1},
            {UNIQUE_VISITORS: 99, UNIQUE_PARTICIPATING_VISITORS: 100},
            {
                "kpi_bounce_ratio": 0.0,
                "kpi_interactions_per_visit": 0.0,
                "kpi_participation_ratio": 1.0,
                "kpi_average_visit_duration_seconds": 0.0,
                "kpi_unique_visitors": 99,
                "kpi_unique_participants": 0,
            },
            id="estimates-clamped",
        ),
    ],
)
def test_window_values(
    sums: dict[str, int], uniques: dict[str, int], expected: dict[str, float]
) -> None:
    snap = KpiSnapshot()
    snap.windows[("c1", "1h")] = WindowData(Counter(sums), dict(uniques))
    assert {name: v for (name, _, _), v in values(snap).items()} == expected


def test_add_counters_sums_partitions() -> None:
    snap = KpiSnapshot()
    snap.add_counters("c1", {"page_views": 2})
    snap.add_counters("c1", {"page_views": 3, "shares": 1})
    snap.add_counters("c2", {"page_views": 1})
    assert snap.counters == {"c1": Counter(page_views=5, shares=1), "c2": Counter(page_views=1)}


def test_window_creates_empty_data_once() -> None:
    snap = KpiSnapshot()
    data = snap.window("c1", "5m")
    assert data == WindowData()
    assert snap.window("c1", "5m") is data


async def test_scenario_window_values() -> None:
    # The scenario of factories.scenario_batches, windows ending at 22:50.
    everything = {
        "kpi_bounce_ratio": 0.25,  # a bounced, of a b c d
        "kpi_interactions_per_visit": 0.5,  # b's two; a's late one is in no visit
        "kpi_participation_ratio": 0.4,  # b and d of a b c d e
        "kpi_average_visit_duration_seconds": 152.5,  # (0 + 540 + 70 + 0) / 4
        "kpi_unique_visitors": 5,
        "kpi_unique_participants": 1,  # Alice twice, other casing and spaces
    }
    expected = {
        **{(name, "c1", "1h"): v for name, v in everything.items()},
        **{(name, "c1", "24h"): v for name, v in everything.items()},
        # 22:46..22:50: only e's page view, no closed visit there: no ratio over visits.
        ("kpi_participation_ratio", "c1", "5m"): 0.0,
        ("kpi_unique_visitors", "c1", "5m"): 1,
        ("kpi_unique_participants", "c1", "5m"): 0,
    }
    store = await run_scenario()
    got = values(await store.read())
    assert got == expected
    assert not [k for k in got if k[0] in RATIOS and k[2] == "5m"]  # absent, not 0 or NaN
