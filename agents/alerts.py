"""KPI threshold alerts: ``alerts.yaml`` turned into Prometheus recording and alerting rules.

The config lists thresholds per campaign (a name, or ``*`` for every campaign) on the window
gauges of the contract, plus the settings of the pipeline alerts. :func:`render_rules` turns it into
rule groups:

- ``kpi-thresholds``: recording rules first, deduplicating the per-worker copies of store-backed
  series with ``max`` (every worker exports the same totals, so a sum would count them once per
  worker), then one alerting rule per threshold. A campaign's own threshold for a KPI and window
  replaces the ``*`` thresholds of that KPI and window for it: the ``*`` rules exclude it.
- ``kpi-pipeline``: consumer lag growing, worker down, no worker up, rejected events spike,
  watermark stalled, store down.

Minimum-traffic guard: a KPI alert fires only when the campaign closed at least ``min_visits``
visits in the last ``window`` of wall-clock time, ``max by (campaign) (increase(kpi_visits_total
[window]))``. ``increase`` per worker series then ``max``: a worker that joined late has a shorter
history, the longest one wins; counter resets (a wiped store) are handled by ``increase``. The
gauges' windows are in event time, the guard's in wall-clock time: for live traffic they cover
the same visits within a session gap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stream.kpis import WINDOW_KPIS
from stream.windows import WINDOWS


class AlertsConfigError(ValueError):
    """The alerts config cannot be read or is invalid; the message says where and why."""


WINDOW_LABELS = tuple(w.label for w in WINDOWS)
KPI_HELP = {kpi.name: kpi.help for kpi in WINDOW_KPIS}

# How each window gauge is shown: a human name, and the unit of its value.
Unit = Literal["percent", "duration", "number", "count"]
KPI_DISPLAY: dict[str, tuple[str, Unit]] = {
    "kpi_bounce_ratio": ("bounce ratio", "percent"),
    "kpi_interactions_per_visit": ("interactions per visit", "number"),
    "kpi_participation_ratio": ("participation ratio", "percent"),
    "kpi_average_visit_duration_seconds": ("average visit duration", "duration"),
    "kpi_unique_visitors": ("unique visitors", "count"),
    "kpi_unique_participants": ("unique participants", "count"),
}
# The value of an alert (``$value``) in an annotation, by unit (Prometheus template functions).
VALUE_TEMPLATE: dict[Unit, str] = {
    "percent": "{{ $value | humanizePercentage }}",
    "duration": "{{ $value | humanizeDuration }}",
    "number": '{{ printf "%.2f" $value }}',
    "count": '{{ printf "%.0f" $value }}',
}
COMPARATOR_WORDS = {">": "above", ">=": "at or above", "<": "below", "<=": "at or below"}

_DURATION = re.compile(r"(?:\d+(?:ms|s|m|h|d|w|y))+")
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_seconds(text: str) -> float:
    """Seconds of a Prometheus duration such as ``90s``, ``10m`` or ``1h30m``.

    Raises:
        ValueError: ``text`` is not a Prometheus duration.
    """
    if not _DURATION.fullmatch(text):
        raise ValueError(f"{text!r} is not a duration like 30s, 10m, 1h or 1h30m")
    return sum(int(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(text))


def _duration(text: str) -> str:
    duration_seconds(text)
    return text


def _positive_duration(text: str) -> str:
    if duration_seconds(text) <= 0:
        raise ValueError(f"{text!r}: must be longer than 0")
    return text


def _url(text: str) -> str:
    if not re.fullmatch(r"https?://\S+", text):
        raise ValueError(f"{text!r} is not an http(s) URL")
    return text


Duration = Annotated[str, AfterValidator(_duration)]
Range = Annotated[str, AfterValidator(_positive_duration)]
Url = Annotated[str, AfterValidator(_url)]
Severity = Literal["warning", "critical"]
Comparator = Literal[">", ">=", "<", "<="]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Threshold(_Model):
    """One KPI threshold: alert when ``kpi`` of ``campaign`` stays past ``threshold`` for ``for``.

    Attributes:
        campaign: a campaign id, or ``*`` for every campaign without its own threshold for this
            KPI and window.
        kpi: a window gauge of the contract (``kpi_bounce_ratio``, ...).
        window: the gauge's event-time window.
        comparator: ``value <comparator> threshold`` is the bad condition.
        threshold: in the KPI's unit (ratios 0..1, durations in seconds).
        for_: how long the condition must hold before firing (``for`` in the file).
        severity: ``warning`` or ``critical``, the alert's ``severity`` label.
        min_visits: the traffic guard: closed visits of the campaign over the last ``window``
            needed to alert (0: no guard).
        runbook_url: optional, becomes the ``runbook_url`` annotation.
    """

    campaign: str = Field(min_length=1, max_length=128)
    kpi: str
    window: str = "1h"
    comparator: Comparator
    threshold: float = Field(ge=0, allow_inf_nan=False)
    for_: Duration = Field(default="10m", alias="for")
    severity: Severity = "warning"
    min_visits: int = Field(default=50, ge=0)
    runbook_url: Url | None = None

    @field_validator("kpi")
    @classmethod
    def _known_kpi(cls, kpi: str) -> str:
        if kpi not in KPI_DISPLAY:
            raise ValueError(f"{kpi!r} is not a window gauge; one of {', '.join(KPI_DISPLAY)}")
        return kpi

    @field_validator("window")
    @classmethod
    def _known_window(cls, window: str) -> str:
        if window not in WINDOW_LABELS:
            raise ValueError(f"{window!r} is not a window; one of {', '.join(WINDOW_LABELS)}")
        return window

    @model_validator(mode="after")
    def _threshold_in_unit(self) -> Threshold:
        if KPI_DISPLAY[self.kpi][1] == "percent" and not 0 <= self.threshold <= 1:
            raise ValueError(
                f"threshold {self.threshold:g}: {self.kpi} is a ratio in 0..1 (write 0.7 for 70%)"
            )
        return self

    @property
    def direction(self) -> Literal["High", "Low"]:
        """``High`` when a value above the threshold is bad, else ``Low``."""
        return "High" if self.comparator.startswith(">") else "Low"

    @property
    def alertname(self) -> str:
        """``KpiBounceRatioHigh``: the KPI in CamelCase (unit suffix dropped) and the direction."""
        words = self.kpi.removesuffix("_seconds").split("_")
        return "".join(w.capitalize() for w in words) + self.direction


class PipelineAlert(_Model):
    """Common settings of a pipeline alert."""

    for_: Duration = Field(default="5m", alias="for")
    severity: Severity = "warning"
    runbook_url: Url | None = None


class ConsumerLagAlert(PipelineAlert):
    """A partition's lag above ``records`` and still growing over ``window``."""

    records: int = Field(default=10_000, ge=0)
    window: Range = "10m"


class WorkerDownAlert(PipelineAlert):
    """A scraped worker is down (``up == 0``)."""

    for_: Duration = Field(default="2m", alias="for")


class NoWorkerUpAlert(PipelineAlert):
    """No worker of the job is up (or none is discovered)."""

    for_: Duration = Field(default="1m", alias="for")
    severity: Severity = "critical"


class RejectedEventsAlert(PipelineAlert):
    """Rejected / (rejected + processed) events above ``ratio`` over ``window``."""

    for_: Duration = Field(default="10m", alias="for")
    ratio: float = Field(default=0.05, gt=0, lt=1)
    min_events: int = Field(default=20, ge=0, description="rejected events in the window needed")
    window: Range = "5m"


class WatermarkStalledAlert(PipelineAlert):
    """The watermark did not move for ``stalled_for`` while events were processed."""

    stalled_for: Range = "15m"
    window: Range = "5m"


class StoreDownAlert(PipelineAlert):
    """A worker cannot read the shared store (``kpi_store_up == 0``)."""

    for_: Duration = Field(default="1m", alias="for")
    severity: Severity = "critical"


class StoreResetAlert(PipelineAlert):
    """A worker found the store reset (``kpi_store_reset_detected == 1``) and applies nothing."""

    for_: Duration = Field(default="0s", alias="for")
    severity: Severity = "critical"


class PipelineAlerts(_Model):
    """The pipeline alerts; ``job`` is the Prometheus scrape job of the workers."""

    job: str = Field(default="kpi-worker", min_length=1)
    consumer_lag: ConsumerLagAlert = Field(default_factory=ConsumerLagAlert)
    worker_down: WorkerDownAlert = Field(default_factory=WorkerDownAlert)
    no_worker_up: NoWorkerUpAlert = Field(default_factory=NoWorkerUpAlert)
    rejected_events: RejectedEventsAlert = Field(default_factory=RejectedEventsAlert)
    watermark_stalled: WatermarkStalledAlert = Field(default_factory=WatermarkStalledAlert)
    store_down: StoreDownAlert = Field(default_factory=StoreDownAlert)
    store_reset: StoreResetAlert = Field(default_factory=StoreResetAlert)


class AlertsConfig(_Model):
    """The whole ``alerts.yaml``."""

    thresholds: list[Threshold] = Field(default_factory=list)
    pipeline: PipelineAlerts = Field(default_factory=PipelineAlerts)

    @model_validator(mode="after")
    def _no_duplicates(self) -> AlertsConfig:
        seen: dict[tuple[str, ...], int] = {}
        for i, t in enumerate(self.thresholds):
            key = (t.campaign, t.kpi, t.window, t.direction, t.severity)
            if key in seen:
                raise ValueError(
                    f"thresholds {seen[key]} and {i} are both {t.severity} {t.direction} "
                    f"thresholds of {t.kpi} ({t.window}) for campaign {t.campaign!r}"
                )
            seen[key] = i
        return self


def parse_config(data: Any, source: str = "alerts config") -> AlertsConfig:
    """Validate parsed YAML; raises :class:`AlertsConfigError` listing every problem."""
    if data is None:
        data = {}
    try:
        return AlertsConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "(top level)"
            shown = error["loc"] and not isinstance(error.get("input"), dict | list)
            got = f" (got {error['input']!r})" if shown else ""
            problems.append(f"  {where}: {error['msg']}{got}")
        raise AlertsConfigError(
            f"{source}: invalid alerts config:\n" + "\n".join(problems)
        ) from exc


def load_config(path: Path) -> AlertsConfig:
    """Read and validate an ``alerts.yaml``; raises :class:`AlertsConfigError`."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AlertsConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise AlertsConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(data, str(path))


# --- rendering ------------------------------------------------------------------------------------


def _string(value: str) -> str:
    """A PromQL string literal (Go escapes; JSON's are a subset once non-ASCII stays raw)."""
    return json.dumps(value, ensure_ascii=False)


def _number(value: float) -> str:
    return repr(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def gauge_record(kpi: str) -> str:
    """Name of the recording rule of a window gauge, one series per campaign and window.

    ``window`` stays a label: it is part of the gauge's identity, like ``le`` of a histogram.
    """
    return f"campaign:{kpi}:max"


def visits_record(window: str) -> str:
    """Name of the recording rule of the closed visits per campaign over ``window``."""
    return f"campaign:kpi_visits:increase{window}"


def format_threshold(kpi: str, value: float) -> str:
    """A threshold as people read it: ``70%``, ``10s``, ``0.5``."""
    unit = KPI_DISPLAY[kpi][1]
    if unit == "percent":
        return f"{value * 100:g}%"
    if unit == "duration":
        return f"{value:g}s"
    return f"{value:g}"


def _recording_rules(thresholds: Iterable[Threshold]) -> list[dict[str, Any]]:
    thresholds = list(thresholds)
    rules: list[dict[str, Any]] = []
    for kpi in sorted({t.kpi for t in thresholds}, key=list(KPI_DISPLAY).index):
        rules.append({"record": gauge_record(kpi), "expr": f"max by (campaign, window) ({kpi})"})
    guarded = {t.window for t in thresholds if t.min_visits > 0}
    for window in (w for w in WINDOW_LABELS if w in guarded):
        rules.append(
            {
                "record": visits_record(window),
                "expr": f"max by (campaign) (increase(kpi_visits_total[{window}]))",
            }
        )
    return rules


def _threshold_rule(t: Threshold, excluded: Iterable[str]) -> dict[str, Any]:
    matchers = [f"window={_string(t.window)}"]
    if t.campaign == "*":
        matchers += [f"campaign!={_string(c)}" for c in sorted(excluded)]
    else:
        matchers.append(f"campaign={_string(t.campaign)}")
    expr = f"{gauge_record(t.kpi)}{{{','.join(matchers)}}} {t.comparator} {_number(t.threshold)}"
    if t.min_visits > 0:
        expr += f"\nand on (campaign)\n{visits_record(t.window)} >= {t.min_visits}"
    name, unit = KPI_DISPLAY[t.kpi]
    words = COMPARATOR_WORDS[t.comparator]
    limit = format_threshold(t.kpi, t.threshold)
    guard = (
        f" The campaign closed at least {t.min_visits} visits in the last {t.window}."
        if t.min_visits > 0
        else ""
    )
    annotations = {
        "summary": f"Campaign {{{{ $labels.campaign }}}}: {name} {words} {limit} ({t.window})",
        "description": (
            f"The {name} of campaign {{{{ $labels.campaign }}}} over the {t.window} window is "
            f"{VALUE_TEMPLATE[unit]}, {words} the {t.severity} threshold {limit} for {t.for_}."
            f"{guard} Definition: {KPI_HELP[t.kpi]}"
        ),
    }
    if t.runbook_url:
        annotations["runbook_url"] = t.runbook_url
    # The series have these labels already; restated, they tell the rules of one alertname apart
    # (promtool's duplicate-rule lint) and show in the rule file which rule is which.
    labels = {"severity": t.severity, "window": t.window}
    if t.campaign != "*":
        labels["campaign"] = t.campaign
    return {
        "alert": t.alertname,
        "expr": expr,
        "for": t.for_,
        "labels": labels,
        "annotations": annotations,
    }


def _alert(
    name: str, expr: str, spec: PipelineAlert, summary: str, description: str
) -> dict[str, Any]:
    annotations = {"summary": summary, "description": description}
    if spec.runbook_url:
        annotations["runbook_url"] = spec.runbook_url
    return {
        "alert": name,
        "expr": expr,
        "for": spec.for_,
        "labels": {"severity": spec.severity},
        "annotations": annotations,
    }


def _pipeline_rules(p: PipelineAlerts) -> list[dict[str, Any]]:
    up = f"up{{job={_string(p.job)}}}"
    lag, rej, wm = p.consumer_lag, p.rejected_events, p.watermark_stalled
    rejected = f"sum(max by (reason) (rate(kpi_events_rejected_total[{rej.window}])))"
    processed = f"max(rate(kpi_events_processed_total[{rej.window}]))"
    return [
        _alert(
            "KpiConsumerLagGrowing",
            f"max by (partition) (kpi_consumer_lag) > {lag.records}\n"
            f"and on (partition)\n"
            f"max by (partition) (deriv(kpi_consumer_lag[{lag.window}])) > 0",
            lag,
            "Consumer lag of partition {{ $labels.partition }} is growing",
            f'Partition {{{{ $labels.partition }}}} has {{{{ printf "%.0f" $value }}}} records '
            f"not applied yet (more than {lag.records}) and its lag grew over the last "
            f"{lag.window}: the workers do not keep up with the traffic.",
        ),
        _alert(
            "KpiWorkerDown",
            f"{up} == 0",
            p.worker_down,
            "Worker {{ $labels.instance }} is down",
            f"Prometheus cannot scrape the kpi worker {{{{ $labels.instance }}}} (job {p.job}) "
            f"for {p.worker_down.for_}; the other workers take over its partitions.",
        ),
        _alert(
            "KpiNoWorkerUp",
            f"absent({up} == 1)",
            p.no_worker_up,
            "No kpi worker is up",
            f"No worker of job {p.job} is up or discovered for {p.no_worker_up.for_}: "
            "no event is processed and the KPIs are frozen.",
        ),
        _alert(
            "KpiRejectedEventsSpike",
            f"{rejected}\n/\n({rejected} + {processed})\n> {_number(rej.ratio)}\n"
            f"and\nsum(max by (reason) (increase(kpi_events_rejected_total[{rej.window}])))"
            f" >= {rej.min_events}",
            rej,
            "{{ $value | humanizePercentage }} of the events are rejected",
            f"{{{{ $value | humanizePercentage }}}} of the events of the last {rej.window} went "
            f"to the dead-letter topic (threshold {rej.ratio:.4g}, at least {rej.min_events} "
            "rejected): see kpi_events_rejected_total by reason.",
        ),
        _alert(
            "KpiWatermarkStalled",
            f"changes(max(kpi_watermark_timestamp_seconds)[{wm.stalled_for}:]) == 0\n"
            f"and\nmax(rate(kpi_events_processed_total[{wm.window}])) > 0",
            wm,
            "The event-time watermark is stalled",
            f"No partition's watermark moved for {wm.stalled_for} while events were processed: "
            "visits do not close and the window KPIs stop moving.",
        ),
        _alert(
            "KpiStoreDown",
            "kpi_store_up == 0",
            p.store_down,
            "Worker {{ $labels.instance }} cannot read the store",
            f"The kpi worker {{{{ $labels.instance }}}} could not read the shared Redis store "
            f"for {p.store_down.for_}: its /metrics has no KPI.",
        ),
        _alert(
            "KpiStoreReset",
            "kpi_store_reset_detected == 1",
            p.store_reset,
            "Worker {{ $labels.instance }} found the KPI store reset",
            "The kpi worker {{ $labels.instance }} found that the shared store lost state the "
            "consumer group had acknowledged (Redis restarted empty, flushed or rolled back). It "
            "applies nothing until the store is restored or the KPIs are rebuilt by a replay "
            "(docs/reliability.md).",
        ),
    ]


def render_rules(config: AlertsConfig) -> dict[str, Any]:
    """The Prometheus rule file (``{"groups": [...]}``) of ``config``."""
    specific: dict[tuple[str, str], set[str]] = {}
    for t in config.thresholds:
        if t.campaign != "*":
            specific.setdefault((t.kpi, t.window), set()).add(t.campaign)
    kpi_rules = _recording_rules(config.thresholds) + [
        _threshold_rule(t, specific.get((t.kpi, t.window), set())) for t in config.thresholds
    ]
    groups = [{"name": "kpi-thresholds", "rules": kpi_rules}] if kpi_rules else []
    groups.append({"name": "kpi-pipeline", "rules": _pipeline_rules(config.pipeline)})
    return {"groups": groups}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_yaml(config: AlertsConfig, source: str = "alerts.yaml") -> str:
    """The rule file as YAML text, with a header naming its ``source``."""
    header = (
        f"# Generated by `kpi alerts render` from {source}: do not edit by hand.\n"
        f"# Edit {source}, then: kpi alerts render --output prometheus/rules/kpi-alerts.yml\n"
    )
    body = yaml.dump(
        render_rules(config), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True
    )
    return header + body
