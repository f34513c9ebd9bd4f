"""The KPI catalog of contract v1 and how each is computed from stored totals.

Counters accumulate per campaign; window gauges fold each window's buckets into aggregators
(:mod:`stream.aggregators`). Names here are the Prometheus metric names of the contract.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from stream.aggregators import Aggregator, BoundedRatio, Mean, Ratio, Sum
from stream.partition import (
    BOUNCED,
    DURATION_MS,
    INTERACTIONS,
    UNIQUE_PARTICIPANTS,
    UNIQUE_PARTICIPATING_VISITORS,
    UNIQUE_VISITORS,
    VISITS,
)


@dataclass(frozen=True, slots=True)
class CounterKpi:
    """A per-campaign total: metric name (without ``_total``), help, stored counter, scale."""

    name: str
    help: str
    counter: str
    scale: float = 1.0


COUNTERS: tuple[CounterKpi, ...] = (
    CounterKpi("kpi_page_views", "Page views (page_view events).", "page_views"),
    CounterKpi("kpi_interactions", "Interactions (interaction events).", "interactions"),
    CounterKpi("kpi_participations", "Submitted entries (participation events).", "participations"),
    CounterKpi("kpi_shares", "Social shares (share events).", "shares"),
    CounterKpi("kpi_visits", "Closed visits.", VISITS),
    CounterKpi("kpi_bounced_visits", "Closed visits with one page view and nothing else.", BOUNCED),
    CounterKpi(
        "kpi_visit_duration_seconds",
        "Sum of closed visits' durations (last minus first event time).",
        DURATION_MS,
        scale=0.001,
    ),
)


@dataclass(slots=True)
class WindowData:
    """One campaign's data in one window: bucket sums and distinct counts."""

    sums: Counter[str] = field(default_factory=Counter)
    uniques: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WindowKpi:
    """A gauge over event-time windows, built by an aggregator from a window's data."""

    name: str
    help: str
    aggregate: Callable[[WindowData], Aggregator]


def _ratio(num: str, den: str) -> Callable[[WindowData], Aggregator]:
    return lambda w: Ratio(w.sums[num], w.sums[den])


def _distinct(kind: str) -> Callable[[WindowData], Aggregator]:
    return lambda w: Sum(w.uniques.get(kind, 0))


WINDOW_KPIS: tuple[WindowKpi, ...] = (
    WindowKpi(
        "kpi_bounce_ratio",
        "Bounced visits / visits, visits started in the window and closed.",
        _ratio(BOUNCED, VISITS),
    ),
    WindowKpi(
        "kpi_interactions_per_visit",
        "Interactions in the window's visits / visits.",
        _ratio(INTERACTIONS, VISITS),
    ),
    WindowKpi(
        "kpi_participation_ratio",
        "Distinct visitors who participated / distinct visitors, events in the window.",
        lambda w: BoundedRatio(
            w.uniques.get(UNIQUE_PARTICIPATING_VISITORS, 0), w.uniques.get(UNIQUE_VISITORS, 0)
        ),
    ),
    WindowKpi(
        "kpi_average_visit_duration_seconds",
        "Mean duration of the window's visits, seconds.",
        lambda w: Mean(w.sums[DURATION_MS] / 1000, w.sums[VISITS]),
    ),
    WindowKpi(
        "kpi_unique_visitors",
        "Distinct visitors with an event in the window (HyperLogLog).",
        _distinct(UNIQUE_VISITORS),
    ),
    WindowKpi(
        "kpi_unique_participants",
        "Distinct participant identities with a participation in the window (HyperLogLog).",
        _distinct(UNIQUE_PARTICIPANTS),
    ),
)


@dataclass(slots=True)
class KpiSnapshot:
    """Everything the metrics show, read from the store at one moment.

    Attributes:
        counters: ``campaign -> counter -> total`` over all partitions.
        pipeline: ``counter -> total`` over all partitions (``rejected:<reason>`` included).
        windows: ``(campaign, window label) -> data``.
        watermarks_ms: ``partition -> watermark`` (epoch ms).
        offsets: ``partition -> last applied offset``.
        newest_event_ms: Newest event time over all partitions: where the windows end.
        open_visits: Open visits over all partitions.
    """

    counters: dict[str, Counter[str]] = field(default_factory=dict)
    pipeline: Counter[str] = field(default_factory=Counter)
    windows: dict[tuple[str, str], WindowData] = field(default_factory=dict)
    watermarks_ms: dict[int, int] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)
    newest_event_ms: int = -1
    open_visits: int = 0

    def add_counters(self, campaign: str, values: Mapping[str, int]) -> None:
        """Add one partition's counters of a campaign."""
        self.counters.setdefault(campaign, Counter()).update(values)

    def window(self, campaign: str, label: str) -> WindowData:
        """The data of one campaign's window (created empty)."""
        key = (campaign, label)
        data = self.windows.get(key)
        if data is None:
            data = self.windows[key] = WindowData()
        return data

    def window_values(self) -> Iterator[tuple[WindowKpi, str, str, float]]:
        """``(kpi, campaign, window, value)`` for every defined window gauge."""
        windows = sorted(self.windows.items())
        for kpi in WINDOW_KPIS:
            aggregate = kpi.aggregate
            for (campaign, label), data in windows:
                value = aggregate(data).result()
                if value is not None:
                    yield kpi, campaign, label, value
