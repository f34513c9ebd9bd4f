"""``kpi demo``: everything on embedded defaults, live KPIs in the terminal.

Starts a Tansu broker and a Redis (or Valkey) server on free loopback ports, one worker process and
a traffic simulator, then shows the KPIs read from the worker's ``/metrics`` until Ctrl-C, which
stops every process it started. Visits use a short 20 s gap so that they close while you watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agents.embedded import EmbeddedBroker, EmbeddedRedis, EmbeddedServerError, port_is_busy
from agents.settings import Settings

DEMO_ENV = {
    "KPI_SESSION_GAP_SECONDS": "20",
    "KPI_IDLE_ADVANCE_SECONDS": "5",
    "KPI_ALLOWED_LATENESS_SECONDS": "10",
    "KPI_BROKER_SESSION_TIMEOUT_SECONDS": "6",
    "KPI_LOG_LEVEL": "WARNING",
}

COLUMNS = (
    ("page views", "kpi_page_views_total", None, "{:,.0f}"),
    ("visits", "kpi_visits_total", None, "{:,.0f}"),
    ("bounce", "kpi_bounce_ratio", "1h", "{:.1%}"),
    ("interact./visit", "kpi_interactions_per_visit", "1h", "{:.2f}"),
    ("particip. rate", "kpi_participation_ratio", "1h", "{:.1%}"),
    ("avg visit", "kpi_average_visit_duration_seconds", "1h", "{:.1f} s"),
    ("unique visitors", "kpi_unique_visitors", "1h", "{:,.0f}"),
    ("unique particip.", "kpi_unique_participants", "1h", "{:,.0f}"),
    ("participations", "kpi_participations_total", None, "{:,.0f}"),
    ("shares", "kpi_shares_total", None, "{:,.0f}"),
)


def _scrape(url: str) -> dict[str, dict[tuple[str, ...], float]]:
    with urllib.request.urlopen(url, timeout=3) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[str, ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.labels.get("campaign", ""), s.labels.get("window", ""))
            samples[s.name][key] = s.value
    return samples


def _table(samples: dict[str, dict[tuple[str, ...], float]], url: str, elapsed_s: float) -> Group:
    table = Table(title=f"Live campaign KPIs (windows: 1h of event time) — {elapsed_s:.0f} s")
    table.add_column("campaign", style="bold")
    for title, *_ in COLUMNS:
        table.add_column(title, justify="right")
    campaigns = sorted({c for c, _ in samples.get("kpi_page_views_total", {})})
    for campaign in campaigns:
        row = [campaign]
        for _, metric, window, fmt in COLUMNS:
            value = samples.get(metric, {}).get((campaign, window or ""))
            row.append("—" if value is None else fmt.format(value))
        table.add_row(*row)

    def total(name: str) -> float:
        return sum(samples.get(name, {}).values())

    health = Text(
        f"processed {total('kpi_events_processed_total'):,.0f}  "
        f"rejected {total('kpi_events_rejected_total'):,.0f}  "
        f"duplicates {total('kpi_events_duplicate_total'):,.0f}  "
        f"late {total('kpi_events_late_total'):,.0f}  "
        f"open visits {total('kpi_open_visits'):,.0f}\n"
        f"Prometheus metrics: {url}   (Ctrl-C stops everything)",
        style="dim",
    )
    return Group(table, health)


def run_demo(rate: float, web_port: int, workdir: Path) -> int:
    """Run the demo until Ctrl-C; returns the exit status."""
    console = Console()
    if port_is_busy(web_port):
        console.print(
            f"[red]port 127.0.0.1:{web_port} is busy[/red]: stop what uses it or choose "
            "another with `kpi demo --web-port N`"
        )
        return 1
    workdir.mkdir(exist_ok=True)
    broker = EmbeddedBroker(log_path=workdir / "broker.log")
    redis = EmbeddedRedis(data_dir=workdir / "redis", log_path=workdir / "redis.log")
    worker: subprocess.Popen[bytes] | None = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so cleanup runs on SIGTERM too
    try:
        console.print("starting an embedded Kafka-compatible broker (Tansu) and Redis…")
        broker.start()
        redis.start()
        env = {
            **os.environ,
            **DEMO_ENV,
            "KPI_KAFKA_BOOTSTRAP": broker.bootstrap,
            "KPI_REDIS_URL": redis.url,
            "KPI_REDIS_PREFIX": f"demo{int(time.time())}",
            "KPI_IDENTITY_KEY": secrets.token_hex(32),
            "KPI_WEB_PORT": str(web_port),
            "KPI_DATA_DIR": str(workdir / "faust"),
        }
        settings = Settings.model_validate(
            {k[4:].lower(): v for k, v in env.items() if k.startswith("KPI_")}
        )
        log = (workdir / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "agents.cli", "worker"], env=env, stdout=log, stderr=log
        )
        console.print(f"worker pid {worker.pid}, logs in {workdir}/worker.log")
        return asyncio.run(_live(console, settings, rate, web_port, worker))
    except EmbeddedServerError as exc:
        console.print(f"[red]cannot start the demo:[/red] {exc}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
        broker.stop()
        redis.stop()
        console.print(
            f"stopped worker, broker and Redis. Kafka data was in memory (gone); Redis data "
            f"(append-only file) is in {redis.data_dir}; logs in {workdir}/."
        )


async def _live(
    console: Console,
    settings: Settings,
    rate: float,
    web_port: int,
    worker: subprocess.Popen[bytes],
) -> int:
    from agents.cli import simulate_traffic

    url = f"http://127.0.0.1:{web_port}/metrics"
    stats: dict[str, int] = {}
    traffic = asyncio.create_task(simulate_traffic(settings, rate, 0.0, None, stats))
    started = time.monotonic()
    try:
        with Live(console=console, refresh_per_second=1) as live:
            while True:
                if worker.poll() is not None:
                    console.print(
                        f"[red]the worker exited ({worker.returncode}); see its log[/red]"
                    )
                    return 1
                if traffic.done():
                    traffic.result()  # raises what stopped the simulator
                samples: dict[str, dict[tuple[str, ...], float]] = {}
                with contextlib.suppress(OSError):
                    samples = await asyncio.to_thread(_scrape, url)
                live.update(_table(samples, url, time.monotonic() - started))
                await asyncio.sleep(2)
    finally:
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await traffic
