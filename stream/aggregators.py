"""KPI aggregators: small mergeable states with ``add``, ``merge`` and ``result``.

Ratios keep numerator and denominator, never a ratio of ratios; ``result`` is ``None`` when the
denominator is 0 (the KPI is then not exported rather than exported as NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Self


class Aggregator(Protocol):
    """What every KPI aggregator offers."""

    def merge(self, other: Self) -> Self:
        """Combine with another aggregator of the same kind (associative, commutative)."""
        ...

    def result(self) -> float | None:
        """The KPI value, ``None`` when undefined."""
        ...


@dataclass(slots=True)
class Sum:
    """A plain total."""

    total: float = 0

    def add(self, value: float) -> None:
        self.total += value

    def merge(self, other: Sum) -> Sum:
        return Sum(self.total + other.total)

    def result(self) -> float | None:
        return self.total


@dataclass(slots=True)
class Ratio:
    """``numerator / denominator``; undefined on an empty denominator."""

    numerator: float = 0
    denominator: float = 0

    def add(self, numerator: float, denominator: float) -> None:
        self.numerator += numerator
        self.denominator += denominator

    def merge(self, other: Ratio) -> Ratio:
        return Ratio(self.numerator + other.numerator, self.denominator + other.denominator)

    def result(self) -> float | None:
        return self.numerator / self.denominator if self.denominator else None


@dataclass(slots=True)
class BoundedRatio(Ratio):
    """A ratio of a part to its whole, clamped to 1 (both sides may be estimates, e.g. HLL)."""

    def merge(self, other: Ratio) -> BoundedRatio:
        return BoundedRatio(self.numerator + other.numerator, self.denominator + other.denominator)

    def result(self) -> float | None:
        value = Ratio.result(self)
        return None if value is None else min(value, 1.0)


@dataclass(slots=True)
class Mean:
    """Mean of added values, each optionally weighted; undefined with no value."""

    total: float = 0
    count: float = 0

    def add(self, value: float, count: float = 1) -> None:
        self.total += value
        self.count += count

    def merge(self, other: Mean) -> Mean:
        return Mean(self.total + other.total, self.count + other.count)

    def result(self) -> float | None:
        return self.total / self.count if self.count else None
