"""The alerts config, the rules rendered from it, and promtool's verdict on them.

The promtool unit tests are generated from the config: for every alerting rule a case where it
fires, one where it does not, and for every guarded KPI threshold a case over the threshold with
too little traffic. Their expected alerts come from a small oracle written here in Python
(:func:`expected_threshold_alerts`), independent of the PromQL it checks.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from agents.alerts import (
    KPI_DISPLAY,
    VALUE_TEMPLATE,
    AlertsConfig,
    AlertsConfigError,
    Threshold,
    duration_seconds,
    load_config,
    parse_config,
    render_rules,
    render_yaml,
)
from agents.cli import main
from stream.kpis import WINDOW_KPIS

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "alerts.yaml"
RULE_FILE = ROOT / "prometheus" / "rules" / "kpi-alerts.yml"
# Edge cases the committed config does not have: every comparator, window and unit, no guard,
# campaign ids that need escaping, runbook URLs, zero `for`.
EDGE_CONFIG = ROOT / "tests" / "data" / "promtool" / "alerts-edge.yaml"
CONFIGS = [CONFIG, EDGE_CONFIG]

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="SKIPPED: promtool is not installed (Debian package `prometheus`; .ci/run installs it)",
)


def config_of(*thresholds: dict[str, Any], **extra: Any) -> AlertsConfig:
    return parse_config({"thresholds": list(thresholds), **extra})


BOUNCE = {"kpi": "kpi_bounce_ratio", "comparator": ">", "threshold": 0.7}


# --- config validation ----------------------------------------------------------------------------


def test_the_committed_config_is_valid_and_uses_every_feature() -> None:
    config = load_config(CONFIG)
    assert {t.campaign for t in config.thresholds} >= {"*", "form-newsletter"}
    assert {t.severity for t in config.thresholds} == {"warning", "critical"}
    assert all(t.min_visits > 0 for t in config.thresholds)


def test_defaults() -> None:
    (t,) = config_of({"campaign": "*", **BOUNCE}).thresholds
    assert (t.window, t.for_, t.severity, t.min_visits, t.runbook_url) == (
        "1h",
        "10m",
        "warning",
        50,
        None,
    )
    assert parse_config(None) == AlertsConfig()  # an empty file: pipeline alerts only


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # a KPI that is not a window gauge of the contract
        ({"kpi": "kpi_bounce_rate"}, "is not a window gauge"),
        # counters have no threshold: they only grow
        ({"kpi": "kpi_visits_total"}, "is not a window gauge"),
        ({"window": "2h"}, "is not a window; one of 5m, 1h, 24h"),
        ({"comparator": "=>"}, "thresholds.0.comparator"),
        ({"threshold": "high"}, "thresholds.0.threshold"),
        ({"threshold": float("nan")}, "thresholds.0.threshold"),
        # 70 meaning 70 %: ratios are 0..1
        ({"threshold": 70}, "kpi_bounce_ratio is a ratio in 0..1 (write 0.7 for 70%)"),
        ({"threshold": -1}, "thresholds.0.threshold"),
        ({"for": "10 minutes"}, "is not a duration"),
        ({"severity": "page"}, "thresholds.0.severity"),
        ({"min_visits": -1}, "thresholds.0.min_visits"),
        ({"campaign": ""}, "thresholds.0.campaign"),
        ({"runbook_url": "wiki/bounce"}, "is not an http(s) URL"),
        # a typo in a key is an error, not a silently ignored setting
        ({"treshold": 0.5}, "thresholds.0.treshold: Extra inputs are not permitted"),
    ],
)
def test_a_bad_threshold_is_a_clear_error(change: dict[str, Any], message: str) -> None:
    with pytest.raises(AlertsConfigError, match=re.escape(message)):
        config_of({"campaign": "*", **BOUNCE, **change})


def test_missing_fields_are_named() -> None:
    with pytest.raises(AlertsConfigError) as info:
        config_of({"campaign": "*"})
    for name in ("kpi", "comparator", "threshold"):
        assert f"thresholds.0.{name}: Field required" in str(info.value)


def test_two_thresholds_of_the_same_alert_are_refused() -> None:
    # Same campaign, KPI, window, direction and severity: which one would win is unclear.
    with pytest.raises(AlertsConfigError, match="thresholds 0 and 1 are both warning High"):
        config_of({"campaign": "*", **BOUNCE}, {"campaign": "*", **BOUNCE, "comparator": ">="})
    # Another severity, window or direction is another alert.
    config_of(
        {"campaign": "*", **BOUNCE},
        {"campaign": "*", **BOUNCE, "severity": "critical", "threshold": 0.9},
        {"campaign": "*", **BOUNCE, "window": "24h"},
        {"campaign": "*", **BOUNCE, "comparator": "<", "threshold": 0.1},
    )


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        ({"consumer_lag": {"window": "0s"}}, "must be longer than 0"),
        ({"rejected_events": {"ratio": 1.5}}, "pipeline.rejected_events.ratio"),
        ({"watermark_stalled": {"stalled": "15m"}}, "Extra inputs are not permitted"),
        ({"store_down": {"severity": "info"}}, "pipeline.store_down.severity"),
    ],
)
def test_bad_pipeline_settings_are_clear_errors(pipeline: dict[str, Any], message: str) -> None:
    with pytest.raises(AlertsConfigError, match=re.escape(message)):
        config_of(pipeline=pipeline)


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(AlertsConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("thresholds: [\n")
    with pytest.raises(AlertsConfigError, match=f"{re.escape(str(bad_yaml))}: not valid YAML"):
        load_config(bad_yaml)
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- campaign: x\n")
    with pytest.raises(AlertsConfigError, match="invalid alerts config"):
        load_config(not_a_mapping)


@pytest.mark.parametrize(
    ("text", "seconds"), [("0s", 0), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("250ms", 0.25)]
)
def test_durations(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


def test_every_window_gauge_can_have_a_threshold() -> None:
    assert set(KPI_DISPLAY) == {kpi.name for kpi in WINDOW_KPIS}


# --- rendering ------------------------------------------------------------------------------------


def rules_by_kind(config: AlertsConfig) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(record name -> expr, alerting rules) of the rendered file."""
    rules = [rule for group in render_rules(config)["groups"] for rule in group["rules"]]
    records = {rule["record"]: rule["expr"] for rule in rules if "record" in rule}
    return records, [rule for rule in rules if "alert" in rule]


def threshold_rules(config: AlertsConfig) -> list[tuple[Threshold, dict[str, Any]]]:
    """Each threshold with its alerting rule (rendered in config order)."""
    (group,) = [g for g in render_rules(config)["groups"] if g["name"] == "kpi-thresholds"]
    alerts = [rule for rule in group["rules"] if "alert" in rule]
    assert len(alerts) == len(config.thresholds)
    return list(zip(config.thresholds, alerts, strict=True))


def test_a_campaigns_own_threshold_takes_precedence_over_star() -> None:
    config = config_of(
        {"campaign": "*", **BOUNCE},
        {"campaign": "*", **BOUNCE, "severity": "critical", "threshold": 0.9},
        {"campaign": "promo", **BOUNCE, "threshold": 0.85},
        {"campaign": 'say "hi"', **BOUNCE, "threshold": 0.95},
        # other window, other KPI: the star rules of 1h bounce ratio are not concerned
        {"campaign": "weekly", **BOUNCE, "window": "24h"},
        {"campaign": "quiz", "kpi": "kpi_participation_ratio", "comparator": "<", "threshold": 0.1},
    )
    exprs = [rule["expr"].splitlines()[0] for _, rule in threshold_rules(config)]
    excluded = 'window="1h",campaign!="promo",campaign!="say \\"hi\\""'
    assert exprs[0] == f"campaign:kpi_bounce_ratio:max{{{excluded}}} > 0.7"
    assert exprs[1] == f"campaign:kpi_bounce_ratio:max{{{excluded}}} > 0.9"
    assert exprs[2] == 'campaign:kpi_bounce_ratio:max{window="1h",campaign="promo"} > 0.85'
    assert exprs[3] == 'campaign:kpi_bounce_ratio:max{window="1h",campaign="say \\"hi\\""} > 0.95'
    assert exprs[4] == 'campaign:kpi_bounce_ratio:max{window="24h",campaign="weekly"} > 0.7'
    assert exprs[5] == 'campaign:kpi_participation_ratio:max{window="1h",campaign="quiz"} < 0.1'


def test_threshold_rules_carry_guard_labels_and_annotations() -> None:
    config = config_of(
        {
            "campaign": "*",
            **BOUNCE,
            "for": "15m",
            "severity": "critical",
            "min_visits": 30,
            "runbook_url": "https://runbooks.example.com/bounce",
        },
        {"campaign": "promo", "kpi": "kpi_unique_visitors", "comparator": "<", "threshold": 5}
        | {"min_visits": 0, "window": "5m"},
    )
    (_, bounce), (_, visitors) = threshold_rules(config)
    assert bounce["alert"] == "KpiBounceRatioHigh"
    assert bounce["expr"] == (
        'campaign:kpi_bounce_ratio:max{window="1h"} > 0.7\n'
        "and on (campaign)\n"
        "campaign:kpi_visits:increase1h >= 30"
    )
    assert bounce["for"] == "15m"
    assert bounce["labels"] == {"severity": "critical", "window": "1h"}
    notes = bounce["annotations"]
    assert notes["runbook_url"] == "https://runbooks.example.com/bounce"
    assert "{{ $labels.campaign }}" in notes["summary"] and "70%" in notes["summary"]
    assert "{{ $value | humanizePercentage }}" in notes["description"]
    assert "at least 30 visits in the last 1h" in notes["description"]
    # min_visits 0: no guard; a specific campaign is restated as a label
    assert visitors["alert"] == "KpiUniqueVisitorsLow"
    assert visitors["expr"] == 'campaign:kpi_unique_visitors:max{window="5m",campaign="promo"} < 5'
    assert visitors["labels"] == {"severity": "warning", "window": "5m", "campaign": "promo"}
    assert "runbook_url" not in visitors["annotations"]


def test_recording_rules_deduplicate_the_workers_copies() -> None:
    records, _ = rules_by_kind(load_config(CONFIG))
    assert records == {
        "campaign:kpi_bounce_ratio:max": "max by (campaign, window) (kpi_bounce_ratio)",
        "campaign:kpi_interactions_per_visit:max": (
            "max by (campaign, window) (kpi_interactions_per_visit)"
        ),
        "campaign:kpi_participation_ratio:max": (
            "max by (campaign, window) (kpi_participation_ratio)"
        ),
        "campaign:kpi_average_visit_duration_seconds:max": (
            "max by (campaign, window) (kpi_average_visit_duration_seconds)"
        ),
        "campaign:kpi_visits:increase1h": "max by (campaign) (increase(kpi_visits_total[1h]))",
        "campaign:kpi_visits:increase24h": "max by (campaign) (increase(kpi_visits_total[24h]))",
    }
    # Naming conventions: level:metric:operations, and no _total after rate/increase.
    for name in records:
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name) and "_total" not in name


def test_every_store_series_in_the_rules_is_deduplicated_with_max() -> None:
    from tests.test_ops_files import metric_names, undeduplicated

    _, alerts = rules_by_kind(load_config(CONFIG))
    records, _ = rules_by_kind(load_config(CONFIG))
    for expr in [*records.values(), *(rule["expr"] for rule in alerts)]:
        assert metric_names(expr), expr
        assert not undeduplicated(expr), (expr, undeduplicated(expr))


def test_pipeline_alerts() -> None:
    _, alerts = rules_by_kind(
        parse_config({"pipeline": {"job": "w", "consumer_lag": {"for": "1m"}}})
    )
    by_name = {rule["alert"]: rule for rule in alerts}
    assert set(by_name) == {
        "KpiConsumerLagGrowing",
        "KpiWorkerDown",
        "KpiNoWorkerUp",
        "KpiRejectedEventsSpike",
        "KpiWatermarkStalled",
        "KpiStoreDown",
        "KpiStoreReset",
    }
    assert by_name["KpiWorkerDown"]["expr"] == 'up{job="w"} == 0'
    assert by_name["KpiStoreReset"]["expr"] == "kpi_store_reset_detected == 1"
    assert by_name["KpiConsumerLagGrowing"]["for"] == "1m"
    assert "(deriv(kpi_consumer_lag[10m])) > 0" in by_name["KpiConsumerLagGrowing"]["expr"]
    assert (
        "changes(max(kpi_watermark_timestamp_seconds)[15m:]) == 0"
        in (by_name["KpiWatermarkStalled"]["expr"])
    )
    for rule in alerts:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_committed_rule_file_is_a_fresh_render() -> None:
    fresh = render_yaml(load_config(CONFIG))
    assert RULE_FILE.read_text(encoding="utf-8") == fresh, (
        "prometheus/rules/kpi-alerts.yml is stale: "
        "run `kpi alerts render --output prometheus/rules/kpi-alerts.yml`"
    )
    assert yaml.safe_load(fresh) == render_rules(load_config(CONFIG))


def test_cli_render(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["alerts", "render", "--config", str(CONFIG)])
    assert result.exit_code == 0, result.output
    assert result.stdout == render_yaml(load_config(CONFIG))
    out = tmp_path / "rules.yml"
    result = runner.invoke(
        main, ["alerts", "render", "--config", str(CONFIG), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_text() == render_yaml(load_config(CONFIG))
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "thresholds:\n  - {campaign: '*', kpi: kpi_bounce, comparator: '>', threshold: 1}\n"
    )
    result = runner.invoke(main, ["alerts", "render", "--config", str(bad)])
    assert result.exit_code == 1
    assert "thresholds.0.kpi" in result.output and "is not a window gauge" in result.output


# --- promtool -------------------------------------------------------------------------------------


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, check=False, cwd=cwd)


@pytest.mark.prometheus
@needs_promtool
@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_promtool_check_rules(config_path: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(render_yaml(load_config(config_path)))
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# The promtool unit tests. Go's template functions, as Prometheus defines them, for the expected
# annotations (prometheus/template/template.go).


def go_g4(value: float) -> str:
    """Go's ``%.4g`` (the same rules as C's and Python's)."""
    return f"{value:.4g}"


def humanize_duration(v: float) -> str:
    if v == 0 or math.isnan(v) or math.isinf(v):
        return f"{go_g4(v)}s" if v == 0 else go_g4(v)
    if abs(v) >= 1:
        sign = "-" if v < 0 else ""
        v = abs(v)
        whole = int(v)
        seconds, minutes = whole % 60, whole // 60 % 60
        hours, days = whole // 3600 % 24, whole // 86400
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{go_g4(v)}s"
    prefix = ""
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(v) >= 1:
            break
        prefix, v = p, v * 1000
    return f"{go_g4(v)}{prefix}s"


VALUE_FORMAT: dict[str, Callable[[float], str]] = {
    VALUE_TEMPLATE["percent"]: lambda v: f"{go_g4(v * 100)}%",
    VALUE_TEMPLATE["duration"]: humanize_duration,
    VALUE_TEMPLATE["number"]: lambda v: f"{v:.2f}",
    VALUE_TEMPLATE["count"]: lambda v: f"{v:.0f}",
}


def expand(template: str, labels: dict[str, str], value: float | None) -> str:
    """An annotation template with its labels and value filled in."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m[1]], template)
    for pattern, fmt in VALUE_FORMAT.items():
        if pattern in text:
            assert value is not None
            text = text.replace(pattern, fmt(value))
    assert "{{" not in text, f"template not understood by the test: {text}"
    return text


def series(start: float, step: float, samples: int) -> str:
    """promtool's expanding notation: ``start``, then ``samples`` more, each ``step`` further."""
    sign = "+" if step >= 0 else "-"
    return f"{start!r}{sign}{abs(step)!r}x{samples}"


def selector(name: str, **labels: str) -> str:
    inner = ",".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in labels.items())
    return f"{name}{{{inner}}}"


WORKERS = ("w1:6066", "w2:6066")


def on_every_worker(name: str, values: str, job: str, **labels: str) -> list[dict[str, str]]:
    """The same store-backed series as each worker exports it."""
    return [
        {"series": selector(name, **labels, instance=w, job=job), "values": values} for w in WORKERS
    ]


@dataclass
class Case:
    """One promtool test group: its input, and the alerts expected at ``eval_min``.

    ``step_min`` is both the sample interval and the rule evaluation interval (see
    :func:`step_for`).
    """

    name: str
    eval_min: int
    input_series: list[dict[str, str]]
    expected: dict[str, list[dict[str, Any]]]  # alertname -> exp_alerts
    covers: set[tuple[int | str, str]] = field(default_factory=set)  # (rule, role)
    promql: list[dict[str, Any]] = field(default_factory=list)
    step_min: int = 1

    def group(self) -> dict[str, Any]:
        assert self.eval_min % self.step_min == 0
        return {
            "name": self.name,
            "interval": f"{self.step_min}m",
            "input_series": self.input_series,
            "alert_rule_test": [
                {"eval_time": f"{self.eval_min}m", "alertname": name, "exp_alerts": alerts}
                for name, alerts in sorted(self.expected.items())
            ],
            "promql_expr_test": self.promql,
        }


def step_for(window_min: int) -> int:
    """Minutes between samples and evaluations for a case over a window: promtool evaluates every
    rule at every step of every case, so a day of 1-minute steps would take seconds per case."""
    return 1 if window_min < 60 else 5 if window_min < 24 * 60 else 15


def compare(value: float, comparator: str, threshold: float) -> bool:
    return {
        ">": value > threshold,
        ">=": value >= threshold,
        "<": value < threshold,
        "<=": value <= threshold,
    }[comparator]


def applicable(config: AlertsConfig, campaign: str, kpi: str, window: str) -> list[int]:
    """Indexes of the thresholds that judge this campaign's KPI: its own, else the ``*`` ones."""
    same = [(i, t) for i, t in enumerate(config.thresholds) if t.kpi == kpi and t.window == window]
    own = [i for i, t in same if t.campaign == campaign]
    return own or [i for i, t in same if t.campaign == "*"]


def expected_threshold_alerts(
    config: AlertsConfig, campaign: str, kpi: str, window: str, value: float, visits: float
) -> tuple[dict[str, list[dict[str, Any]]], set[int]]:
    """The oracle: the alerts a campaign's gauge ``value`` with ``visits`` must raise."""
    rules = threshold_rules(config)
    expected: dict[str, list[dict[str, Any]]] = {}
    firing = set()
    for i in applicable(config, campaign, kpi, window):
        t, rule = rules[i]
        expected.setdefault(t.alertname, [])
        if compare(value, t.comparator, t.threshold) and visits >= t.min_visits:
            labels = {"campaign": campaign, "window": window, "severity": t.severity}
            expected[t.alertname].append(
                {
                    "exp_labels": labels,
                    "exp_annotations": {
                        k: expand(v, labels, value) for k, v in rule["annotations"].items()
                    },
                }
            )
            firing.add(i)
    return expected, firing


def beyond(t: Threshold) -> float:
    """A value clearly on the alerting side of the threshold."""
    if t.comparator.startswith(">"):
        return t.threshold * 1.25 if t.threshold > 0 else t.threshold + 1
    return t.threshold * 0.5 if t.threshold > 0 else t.threshold - 1


def short_of(t: Threshold) -> float:
    """A value clearly on the healthy side."""
    if t.comparator.startswith(">"):
        return t.threshold * 0.5 if t.threshold > 0 else t.threshold - 1
    return t.threshold * 1.25 if t.threshold > 0 else t.threshold + 1


def threshold_cases(config: AlertsConfig, job: str) -> list[Case]:
    """For each threshold: beyond it, at it, healthy, and beyond it with little traffic; and
    beyond it for every campaign that has its own threshold (the ``*`` rule must skip them)."""
    cases = []
    rules = threshold_rules(config)
    for i, (t, _) in enumerate(rules):
        window_min = int(duration_seconds(t.window) // 60)
        step = step_for(window_min)
        busy = 2 * max([u.min_visits for u in config.thresholds] + [1])
        inclusive = t.comparator in (">=", "<=")
        # (campaign, variant, value, closed visits in the window, what rule i must do)
        own = t.campaign if t.campaign != "*" else "any-campaign"
        variants: list[tuple[str, str, float, float, str]] = [
            (own, "beyond", beyond(t), busy, "fires"),
            (own, "at the threshold", t.threshold, busy, "fires" if inclusive else "silent"),
            (own, "healthy", short_of(t), busy, "silent"),
        ]
        if t.min_visits > 0:
            variants.append((own, "low traffic", beyond(t), t.min_visits / 2, "guarded"))
        if t.campaign == "*":
            variants += [
                (u.campaign, "has its own threshold", beyond(t), busy, "excluded")
                for u in config.thresholds
                if u.campaign != "*" and (u.kpi, u.window) == (t.kpi, t.window)
            ]
        for campaign, variant, value, visits, role in variants:
            expected, firing = expected_threshold_alerts(
                config, campaign, t.kpi, t.window, value, visits
            )
            assert (i in firing) == (role == "fires"), (i, variant)
            # Evaluated once the window is full and the longest `for` of its rules has passed.
            judges = [rules[j][0] for j in applicable(config, campaign, t.kpi, t.window)]
            eval_min = window_min + max(int(duration_seconds(j.for_) // 60) for j in judges)
            eval_min = -(-eval_min // step) * step + 2 * step
            samples = eval_min // step
            labels = {"campaign": campaign, "window": t.window}
            visit_step = visits / window_min * step
            cases.append(
                Case(
                    name=f"rule {i} {t.alertname} {t.severity}, {campaign}: {variant}",
                    eval_min=eval_min,
                    step_min=step,
                    input_series=[
                        *on_every_worker(t.kpi, f"{value!r}x{samples}", job, **labels),
                        *on_every_worker(
                            "kpi_visits_total",
                            series(0, visit_step, samples),
                            job,
                            campaign=campaign,
                        ),
                    ],
                    expected=expected,
                    covers={(i, role)},
                )
            )
    return cases


def recording_cases(config: AlertsConfig, job: str) -> list[Case]:
    """Every recording rule returns one deduplicated series, equal to the true value."""
    records, _ = rules_by_kind(config)
    cases = []
    for name in records:
        kpi = name.split(":")[1]
        if kpi == "kpi_visits":
            window = name.removeprefix("campaign:kpi_visits:increase")
            window_min = int(duration_seconds(window) // 60)
            step = step_for(window_min)
            samples = window_min // step + 2
            joined = samples - window_min // step // 2
            # 3 visits a minute. w2 joined half a window ago, with the store's totals of then: the
            # max of the increases is the true one, a sum would count w2's half window twice.
            per_sample = 3 * step
            inputs = [
                {
                    "series": selector("kpi_visits_total", campaign="c", instance=WORKERS[0]),
                    "values": series(0, per_sample, samples),
                },
                {
                    "series": selector("kpi_visits_total", campaign="c", instance=WORKERS[1]),
                    "values": f"_x{joined} "
                    + series(per_sample * joined, per_sample, samples - joined),
                },
            ]
            expected = [{"labels": selector(name, campaign="c"), "value": 3 * window_min}]
        else:
            step, samples = 1, 5
            inputs = on_every_worker(kpi, f"0.25x{samples}", job, campaign="c", window="1h")
            expected = [{"labels": selector(name, campaign="c", window="1h"), "value": 0.25}]
        eval_min = samples * step
        query = {"expr": name, "eval_time": f"{eval_min}m", "exp_samples": expected}
        cases.append(Case(f"record {name}", eval_min, inputs, {}, promql=[query], step_min=step))
    return cases


def pipeline_cases(config: AlertsConfig) -> list[Case]:
    p = config.pipeline
    _, alerts = rules_by_kind(config)
    rule = {r["alert"]: r for r in alerts}

    def alert(name: str, labels: dict[str, str], value: float | None = None) -> dict[str, Any]:
        spec = rule[name]
        full = {**labels, "severity": spec["labels"]["severity"]}
        return {
            "exp_labels": full,
            "exp_annotations": {k: expand(v, full, value) for k, v in spec["annotations"].items()},
        }

    def minutes(d: str) -> int:
        return int(duration_seconds(d) // 60)

    cases = []

    # Consumer lag: above the limit and growing / below it and growing / above it and shrinking.
    lag = p.consumer_lag
    t = minutes(lag.window) + minutes(lag.for_) + 10
    lag_series = selector("kpi_consumer_lag", partition="3", instance=WORKERS[0], job=p.job)
    growing = lag.records + 1 + 10 * t
    variants: list[tuple[str, str, list[float]]] = [
        ("above and growing", series(lag.records + 1, 10, t), [growing])
    ]
    if lag.records >= 4:
        variants.append(("below and growing", series(0, lag.records / (2 * t), t), []))
    variants.append(("above but flat", series(lag.records + 1, 0, t), []))
    variants.append(("above but shrinking", series(lag.records + 1 + 10 * t, -10, t), []))
    for variant, values, lags in variants:
        cases.append(
            Case(
                f"KpiConsumerLagGrowing: {variant}",
                t,
                [{"series": lag_series, "values": values}],
                {
                    "KpiConsumerLagGrowing": [
                        alert("KpiConsumerLagGrowing", {"partition": "3"}, v) for v in lags
                    ]
                },
                covers={("KpiConsumerLagGrowing", "fires" if lags else "silent")},
            )
        )

    # Worker down / no worker up.
    t = max(minutes(p.worker_down.for_), minutes(p.no_worker_up.for_)) + 5
    one_down = [
        {"series": selector("up", instance=WORKERS[0], job=p.job), "values": f"0x{t}"},
        {"series": selector("up", instance=WORKERS[1], job=p.job), "values": f"1x{t}"},
    ]
    down = {"instance": WORKERS[0], "job": p.job}
    cases += [
        Case(
            "one worker down",
            t,
            one_down,
            {"KpiWorkerDown": [alert("KpiWorkerDown", down)], "KpiNoWorkerUp": []},
            covers={("KpiWorkerDown", "fires"), ("KpiNoWorkerUp", "silent")},
        ),
        Case(
            "every worker up",
            t,
            on_every_worker("up", f"1x{t}", p.job),
            {"KpiWorkerDown": [], "KpiNoWorkerUp": []},
            covers={("KpiWorkerDown", "silent")},
        ),
        Case(
            "every worker down",
            t,
            on_every_worker("up", f"0x{t}", p.job),
            {
                "KpiNoWorkerUp": [alert("KpiNoWorkerUp", {})],
                "KpiWorkerDown": [
                    alert("KpiWorkerDown", {"instance": w, "job": p.job}) for w in WORKERS
                ],
            },
            covers={("KpiNoWorkerUp", "fires")},
        ),
        Case(
            "no worker discovered",
            t,
            on_every_worker("up", f"1x{t}", "another-job"),
            {"KpiNoWorkerUp": [alert("KpiNoWorkerUp", {})]},
            covers={("KpiNoWorkerUp", "fires")},
        ),
    ]

    # Rejected events: share over the limit / under it / over it with too few rejections.
    rej = p.rejected_events
    t = minutes(rej.window) + minutes(rej.for_) + 10
    window_s = duration_seconds(rej.window)
    busy = max(1.0, 2 * rej.min_events / window_s)  # rejected per second

    def rejected_case(variant: str, rejected_per_s: float, share: float) -> Case:
        processed_per_s = rejected_per_s * (1 - share) / share
        fires = share > rej.ratio and rejected_per_s * window_s >= rej.min_events
        inputs = [
            *on_every_worker(
                "kpi_events_rejected_total",
                series(0, 60 * rejected_per_s, t),
                p.job,
                reason="invalid_json",
            ),
            *on_every_worker("kpi_events_rejected_total", f"0x{t}", p.job, reason="too_large"),
            *on_every_worker(
                "kpi_events_processed_total", series(0, 60 * processed_per_s, t), p.job
            ),
        ]
        fired = [alert("KpiRejectedEventsSpike", {}, share)] if fires else []
        return Case(
            f"KpiRejectedEventsSpike: {variant}",
            t,
            inputs,
            {"KpiRejectedEventsSpike": fired},
            covers={("KpiRejectedEventsSpike", "fires" if fires else "silent")},
        )

    spike = 0.5 if rej.ratio < 0.5 else (1 + rej.ratio) / 2
    cases.append(rejected_case("spike", busy, spike))
    cases.append(rejected_case("a few", busy, rej.ratio / 2))
    if rej.min_events > 0:
        cases.append(rejected_case("low traffic", rej.min_events / (2 * window_s), spike))

    # Watermark: stalled while events arrive / moving / stalled with no event at all.
    wm = p.watermark_stalled
    t = minutes(wm.stalled_for) + minutes(wm.window) + minutes(wm.for_) + 10
    for variant, watermark_step, processed_step, fires in (
        ("stalled while events arrive", 0, 60, True),
        ("moving", 60, 60, False),
        ("stalled, no traffic", 0, 0, False),
    ):
        inputs = [
            *on_every_worker(
                "kpi_watermark_timestamp_seconds",
                series(1_700_000_000, watermark_step, t),
                p.job,
                partition="0",
            ),
            *on_every_worker("kpi_events_processed_total", series(0, processed_step, t), p.job),
        ]
        cases.append(
            Case(
                f"KpiWatermarkStalled: {variant}",
                t,
                inputs,
                {"KpiWatermarkStalled": [alert("KpiWatermarkStalled", {})] if fires else []},
                covers={("KpiWatermarkStalled", "fires" if fires else "silent")},
            )
        )

    # A worker's own store gauge: bad on one worker / good everywhere.
    for name, metric, settings, bad, good in (
        ("KpiStoreDown", "kpi_store_up", p.store_down, 0, 1),
        ("KpiStoreReset", "kpi_store_reset_detected", p.store_reset, 1, 0),
    ):
        t = minutes(settings.for_) + 5
        for variant, first, fires in (("one worker", bad, True), ("none", good, False)):
            inputs = [
                {
                    "series": selector(metric, instance=WORKERS[0], job=p.job),
                    "values": f"{first}x{t}",
                },
                {
                    "series": selector(metric, instance=WORKERS[1], job=p.job),
                    "values": f"{good}x{t}",
                },
            ]
            fired = [alert(name, {"instance": WORKERS[0], "job": p.job})] if fires else []
            cases.append(
                Case(
                    f"{name}: {variant}",
                    t,
                    inputs,
                    {name: fired},
                    covers={(name, "fires" if fires else "silent")},
                )
            )
    return cases


def promtool_cases(config: AlertsConfig) -> list[Case]:
    job = config.pipeline.job
    return threshold_cases(config, job) + recording_cases(config, job) + pipeline_cases(config)


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_the_generated_unit_tests_cover_every_rule(config_path: Path) -> None:
    config = load_config(config_path)
    covered = set().union(*(case.covers for case in promtool_cases(config)))
    for i, t in enumerate(config.thresholds):
        assert {(i, "fires"), (i, "silent")} <= covered, t
        if t.min_visits > 0:
            assert (i, "guarded") in covered, t
    _, alerts = rules_by_kind(config)
    for name in {rule["alert"] for rule in alerts} - {t.alertname for t in config.thresholds}:
        assert {(name, "fires"), (name, "silent")} <= covered, name
    records, _ = rules_by_kind(config)
    tested = {query["expr"] for case in promtool_cases(config) for query in case.promql}
    assert tested == set(records)


@pytest.mark.prometheus
@needs_promtool
@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_promtool_unit_tests(config_path: Path, tmp_path: Path) -> None:
    config = load_config(config_path)
    (tmp_path / "rules.yml").write_text(render_yaml(config))
    files = []
    cases = promtool_cases(config)
    for step in sorted({case.step_min for case in cases}):
        tests = {
            "rule_files": ["rules.yml"],
            "evaluation_interval": f"{step}m",
            "tests": [case.group() for case in cases if case.step_min == step],
        }
        test_file = tmp_path / f"rules-every-{step}m.test.yml"
        test_file.write_text(yaml.safe_dump(tests, sort_keys=False, allow_unicode=True, width=200))
        files.append(test_file.name)
    result = promtool("test", "rules", *files, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr
    assert result.stdout.count("SUCCESS") == len(files), result.stdout
