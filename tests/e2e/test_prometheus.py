"""End to end: a real Prometheus scrapes a real `kpi worker` fed by a scripted scenario.

Prometheus (Debian's package) runs on a free loopback port with a 1 s scrape and evaluation
interval and rules rendered from a test alerts config with short ``for``. The test then checks
through Prometheus' HTTP API that:

- the bounce-ratio alert goes pending, then firing, for the campaign over its threshold with
  enough visits, and never alerts for the campaign over it with too few visits (the guard);
- every rule evaluates without error, every recording rule returns data, and every metric a rule
  reads (committed rules included) is exported by the worker;
- every PromQL expression of every panel of both Grafana dashboards returns data;

and that ``promtool check metrics`` has nothing to say about the worker's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from agents.alerts import load_config, parse_config, render_rules, render_yaml
from agents.embedded import free_port
from tests.conftest import Deployment, WorkerProcess
from tests.integration.test_scenario import produce, visitor_on
from tests.test_ops_files import dashboard_exprs, metric_names

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.prometheus,
    pytest.mark.skipif(
        shutil.which("prometheus") is None or shutil.which("promtool") is None,
        reason="SKIPPED: Debian's prometheus/promtool are not installed (.ci/run installs them)",
    ),
]

HOT, LOW = "hot", "low"
# The test's alerts: one threshold per window gauge (so every kind of recording rule runs), all
# guarded by 10 closed visits; only the bounce ratio is over its threshold in the scenario.
TEST_ALERTS: dict[str, Any] = {
    "thresholds": [
        {"kpi": "kpi_bounce_ratio", "comparator": ">", "threshold": 0.7, "for": "3s"},
        {"kpi": "kpi_interactions_per_visit", "comparator": ">", "threshold": 100},
        {"kpi": "kpi_participation_ratio", "comparator": "<", "threshold": 0.01},
        {"kpi": "kpi_average_visit_duration_seconds", "comparator": ">", "threshold": 3600},
        {"kpi": "kpi_unique_visitors", "comparator": ">", "threshold": 1e6},
        {"kpi": "kpi_unique_participants", "comparator": ">", "threshold": 1e6},
    ],
    "pipeline": {
        "consumer_lag": {"window": "1m", "for": "0s"},
        "worker_down": {"for": "0s"},
        "no_worker_up": {"for": "0s"},
        "rejected_events": {"window": "1m", "for": "0s"},
        "watermark_stalled": {"stalled_for": "1m", "window": "1m", "for": "0s"},
        "store_down": {"for": "0s"},
    },
}
for _threshold in TEST_ALERTS["thresholds"]:
    _threshold.update({"campaign": "*", "window": "1h", "min_visits": 10})
    _threshold.setdefault("for", "0s")

# Grafana variables as a user would pick them (every campaign, or the scenario's hot one).
DASHBOARD_VARIABLES = {"$window": "1h", "$__rate_interval": "1m", "$__interval": "1s"}


class Prometheus:
    """A `prometheus` process on a free loopback port, with its HTTP API."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited\n{self.log_tail()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready in {timeout_s} s\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the error in the body
            body = json.load(exc)
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def wait_for(
        self, what: str, probe: Callable[[], Any], timeout_s: float = 20.0, every_s: float = 0.25
    ) -> Any:
        """Call ``probe`` until it returns something truthy; fail saying ``what`` was awaited."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            last = probe()
            if last:
                return last
            time.sleep(every_s)
        raise AssertionError(f"{what}: not in {timeout_s} s (last: {last})\n{self.log_tail()}")


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Prometheus]]:
    started: list[Prometheus] = []

    def start(config: dict[str, Any]) -> Prometheus:
        server = Prometheus(tmp_path, config)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def event(event_id: str, kind: str, ts_ms: int, campaign: str, visitor: str, **extra: Any) -> Any:
    value = {
        "event_id": event_id,
        "type": kind,
        "ts": ts_ms,
        "campaign_id": campaign,
        "visitor_id": visitor,
        **extra,
    }
    return (visitor.encode(), None, orjson.dumps(value))


def scenario(now_ms: int) -> tuple[list[Any], list[Any]]:
    """Phase 1 opens the visits; phase 2 moves both partitions' watermarks past them.

    ``hot``: 16 one-page visits (bounces) and 4 engaged ones, 20 visits, bounce ratio 0.8: over
    the 0.7 threshold with more than the 10 visits of the guard. ``low``: 3 bounces, ratio 1.0
    but only 3 visits. Plus one duplicate and one malformed record for the health panels.
    """
    start = now_ms - 10 * 60_000
    s = 1000
    phase1 = []
    for i in range(16):
        phase1.append(event(f"hb{i}", "page_view", start + i * s, HOT, f"bouncer{i}"))
    for i in range(4):
        visitor = f"engaged{i}"
        person = {"first_name": f"P{i}", "last_name": "Test", "email": f"p{i}@example.com"}
        phase1 += [
            event(f"he{i}a", "page_view", start + i * s, HOT, visitor),
            event(f"he{i}b", "interaction", start + (i + 10) * s, HOT, visitor, action="vote"),
            event(
                f"he{i}c", "participation", start + (i + 20) * s, HOT, visitor, participant=person
            ),
        ]
    for i in range(3):
        phase1.append(event(f"lb{i}", "page_view", start + i * s, LOW, f"lonely{i}"))
    phase1.append(event("hb0", "page_view", start, HOT, "bouncer0"))  # a duplicate
    phase1.append((b"x", 0, b"{not json"))  # rejected: invalid_json
    # One page view per partition at "now": watermarks pass every visit above + the 60 s gap.
    phase2 = [
        event(f"closer{p}", "page_view", now_ms, HOT, visitor_on(p, "closer")) for p in (0, 1)
    ]
    return phase1, phase2


def substitute(expr: str, campaign: str) -> str:
    for variable, value in {"$campaign": campaign, **DASHBOARD_VARIABLES}.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a dashboard variable the test does not know: {expr}"
    return expr


def has_data(prom: Prometheus, query: str) -> bool:
    """Whether ``query`` returns at least one sample with a number (not NaN, as an empty rate
    of a histogram would give)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in prom.query(query))


def exported_names(text: str) -> set[str]:
    return {m[1] for m in re.finditer(r"^([a-zA-Z_:][\w:]*)(?:\{| )", text, flags=re.M)}


def test_prometheus_scrapes_the_worker_dashboards_and_alerts_work(
    deployment: Deployment,
    prometheus_factory: Callable[[dict[str, Any]], Prometheus],
    tmp_path: Path,
) -> None:
    worker: WorkerProcess = deployment.worker(
        KPI_EVENTS_PARTITIONS="2",
        KPI_SESSION_GAP_SECONDS="60",
        KPI_IDLE_ADVANCE_SECONDS="3600",
    )
    worker.wait_until(lambda m: "kpi_store_up" in m)

    alerts_config = parse_config(TEST_ALERTS)
    rules_path = tmp_path / "rules.yml"
    rules_path.write_text(render_yaml(alerts_config))
    prom = prometheus_factory(
        {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(rules_path)],
            "scrape_configs": [
                {
                    "job_name": "kpi-worker",
                    "static_configs": [{"targets": [f"127.0.0.1:{worker.port}"]}],
                }
            ],
        }
    )
    prom.wait_for("the worker is scraped", lambda: prom.query('up{job="kpi-worker"} == 1'))

    # Phase 1: Prometheus must see the campaigns with 0 closed visits before they close, so that
    # increase(kpi_visits_total[1h]), the traffic guard, sees them close.
    env = deployment.env
    phase1, phase2 = scenario(int(time.time() * 1000))
    asyncio.run(produce(env["KPI_KAFKA_BOOTSTRAP"], env["KPI_EVENTS_TOPIC"], phase1))
    prom.wait_for(
        "both campaigns scraped with no closed visit",
        lambda: len(prom.query("max by (campaign) (kpi_visits_total) == 0")) == 2,
    )
    asyncio.run(produce(env["KPI_KAFKA_BOOTSTRAP"], env["KPI_EVENTS_TOPIC"], phase2))
    worker.wait_until(
        lambda m: m.get("kpi_visits_total", {}).get(frozenset({("campaign", HOT)})) == 20
    )

    # The bounce alert of `hot`: pending (for: 3s), then firing; never any alert for `low`.
    seen: dict[str, float] = {}
    low_alerts: list[dict[str, Any]] = []

    def bounce_state() -> bool:
        for alert in prom.alerts():
            labels = alert["labels"]
            if labels.get("campaign") == LOW:
                low_alerts.append(alert)
            if labels["alertname"] == "KpiBounceRatioHigh" and labels.get("campaign") == HOT:
                seen.setdefault(alert["state"], time.monotonic())
                assert float(alert["value"]) == pytest.approx(0.8)
        return "firing" in seen

    prom.wait_for("KpiBounceRatioHigh firing for hot", bounce_state, timeout_s=30, every_s=0.2)
    assert not low_alerts, low_alerts
    assert "pending" in seen and seen["pending"] < seen["firing"], seen
    (firing,) = [
        a
        for a in prom.alerts()
        if a["labels"]["alertname"] == "KpiBounceRatioHigh" and a["state"] == "firing"
    ]
    assert firing["labels"] == {
        "alertname": "KpiBounceRatioHigh",
        "campaign": HOT,
        "window": "1h",
        "severity": "warning",
    }
    assert firing["annotations"]["summary"] == "Campaign hot: bounce ratio above 70% (1h)"
    assert "is 80%, above the warning threshold 70%" in firing["annotations"]["description"]
    # `low` is over the threshold too, but with 3 closed visits: the guard holds it back.
    (low_ratio,) = prom.query('campaign:kpi_bounce_ratio:max{campaign="low",window="1h"}')
    assert low_ratio["value"][1] == "1"
    (low_visits,) = prom.query('campaign:kpi_visits:increase1h{campaign="low"}')
    assert 3 <= float(low_visits["value"][1]) < 10

    # Every rule evaluates without error; every recording rule returns data.
    def rule_health() -> list[str]:
        groups = prom.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == sum(len(g["rules"]) for g in render_rules(alerts_config)["groups"])
        bad = [f"{r['name']}: {r['health']} {r.get('lastError', '')}" for r in rules]
        return [b for b, r in zip(bad, rules, strict=True) if r["health"] != "ok"] or ["ok"]

    assert prom.wait_for("every rule evaluated", lambda: rule_health() == ["ok"] or None)
    for group in render_rules(alerts_config)["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                name = rule["record"]
                query = f'{name}{{campaign="hot"}}'
                prom.wait_for(f"recorded {name}", partial(prom.query, query))

    # Every metric read by a rule, of the test's rules and of the committed ones, is exported by
    # the worker (a typo in a rule would otherwise make an alert that can never fire).
    text = worker.scrape_text()
    exported = exported_names(text) | {"up"}
    for config in (alerts_config, load_config(ROOT / "alerts.yaml")):
        for group in render_rules(config)["groups"]:
            for rule in group["rules"]:
                raw = {n for n in metric_names(rule["expr"]) if ":" not in n}
                assert raw <= exported, f"{rule.get('alert', rule.get('record'))}: {raw - exported}"

    # The campaign variable (Grafana's label_values(kpi_page_views_total, campaign)) offers both.
    values = prom.api("label/campaign/values", **{"match[]": "kpi_page_views_total"})
    assert {HOT, LOW} <= set(values)
    # Every query of every dashboard panel returns data, for all campaigns and for one.
    for campaign in (".*", HOT):
        for where, expr in dashboard_exprs():
            query = substitute(expr, campaign)
            prom.wait_for(
                f"data for {where} ({query})",
                partial(has_data, prom, query),
                timeout_s=15,
            )

    # The low campaign never alerted, start to end.
    bounce_state()
    assert not low_alerts, low_alerts

    # promtool's lint of the exposition (names, units, suffixes, help) finds nothing.
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
