"""The ``kpi`` command: worker, produce, simulate, demo.

Every option reads the ``KPI_*`` environment variable of the same name (shown in ``--help``); the
settings object is built once here and passed down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click
import orjson
from aiokafka import AIOKafkaProducer

from agents.alerts_cli import alerts
from agents.settings import Settings

log = logging.getLogger("kpi")


def _settings(**overrides: Any) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**values)
    except Exception as exc:  # pydantic's validation error, said plainly
        raise click.UsageError(f"invalid configuration: {exc}") from exc


def _env_help() -> str:
    lines = ["\b", "Configuration (environment variables, defaults in brackets):"]
    for name, info in Settings.model_fields.items():
        shown = "secret, no default" if name == "identity_key" else repr(info.default)
        lines.append(f"  KPI_{name.upper():<32} {info.description} [{shown}]")
    return "\n".join(lines)


@click.group(epilog=_env_help(), context_settings={"max_content_width": 120})
def main() -> None:
    """kpi-stream: real-time KPIs of interactive-marketing campaigns."""


@main.command()
@click.option("--kafka-bootstrap", envvar="KPI_KAFKA_BOOTSTRAP", help="KPI_KAFKA_BOOTSTRAP")
@click.option("--redis-url", envvar="KPI_REDIS_URL", help="KPI_REDIS_URL")
@click.option("--web-port", envvar="KPI_WEB_PORT", type=int, help="KPI_WEB_PORT")
def worker(kafka_bootstrap: str | None, redis_url: str | None, web_port: int | None) -> None:
    """One worker process (Faust); start several to share the partitions."""
    settings = _settings(kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, web_port=web_port)
    run_worker(settings)


def run_worker(settings: Settings) -> None:
    """Create the topics, then run the Faust worker until SIGTERM or Ctrl-C."""
    import faust  # imported here: `kpi produce` and friends need not pay for it

    from agents.app import create_app
    from agents.kafka import ensure_topics

    if not settings.identity_key.get_secret_value():
        raise click.UsageError("KPI_IDENTITY_KEY is required: the secret key hashing identities")
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    partitions = asyncio.run(ensure_topics(settings))
    asyncio.set_event_loop(asyncio.new_event_loop())
    app = create_app(settings, partitions)
    faust.Worker(
        app,
        loglevel=settings.log_level.upper(),
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    ).execute_from_commandline()


def _lines(stream: IO[str]) -> Iterator[bytes]:
    for line in stream:
        line = line.strip()
        if line:
            yield line.encode()


def record_key(value: bytes) -> bytes | None:
    """The record key of a JSON line: its visitor, or ``None`` (mixed or unreadable)."""
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    events = decoded if isinstance(decoded, list) else [decoded]
    visitors = {e.get("visitor_id") for e in events if isinstance(e, dict)}
    if len(visitors) == 1:
        (visitor,) = visitors
        if isinstance(visitor, str):
            return visitor.encode()
    return None


@main.command()
@click.argument("source", type=click.File("r"), default="-")
@click.option("--kafka-bootstrap", envvar="KPI_KAFKA_BOOTSTRAP", help="KPI_KAFKA_BOOTSTRAP")
@click.option("--events-topic", envvar="KPI_EVENTS_TOPIC", help="KPI_EVENTS_TOPIC")
def produce(source: IO[str], kafka_bootstrap: str | None, events_topic: str | None) -> None:
    """Publish JSON lines (one event or one array per line) from SOURCE (a file, or - for stdin).

    Each line is sent as is, keyed by its visitor_id when it has a single one.
    """
    settings = _settings(kafka_bootstrap=kafka_bootstrap, events_topic=events_topic)
    count = asyncio.run(_produce(settings, _lines(source)))
    click.echo(f"published {count} records to {settings.events_topic}", err=True)


async def _produce(settings: Settings, values: Iterator[bytes]) -> int:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=5,
        max_request_size=16 * 1024 * 1024,
    )
    await producer.start()
    count = 0
    try:
        pending = []
        for value in values:
            pending.append(await producer.send(settings.events_topic, value, key=record_key(value)))
            count += 1
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return count


@main.command()
@click.option("--rate", type=float, default=200.0, show_default=True, help="Events per second")
@click.option("--duration", type=float, default=0.0, help="Seconds to run (0: until Ctrl-C)")
@click.option("--seed", type=int, default=None, help="Random seed, for reproducible traffic")
@click.option("--kafka-bootstrap", envvar="KPI_KAFKA_BOOTSTRAP", help="KPI_KAFKA_BOOTSTRAP")
@click.option("--events-topic", envvar="KPI_EVENTS_TOPIC", help="KPI_EVENTS_TOPIC")
def simulate(
    rate: float,
    duration: float,
    seed: int | None,
    kafka_bootstrap: str | None,
    events_topic: str | None,
) -> None:
    """Publish realistic synthetic campaign traffic at RATE events per second."""
    settings = _settings(kafka_bootstrap=kafka_bootstrap, events_topic=events_topic)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        sent = asyncio.run(simulate_traffic(settings, rate, duration, seed))
    except KeyboardInterrupt:
        return
    click.echo(f"published {sent} events", err=True)


async def simulate_traffic(
    settings: Settings,
    rate: float,
    duration: float,
    seed: int | None,
    stats: dict[str, int] | None = None,
) -> int:
    """Publish simulated traffic in real time; returns how many events were sent."""
    from agents.kafka import ensure_topics
    from agents.simulator import Simulator

    partitions = await ensure_topics(settings)
    sim = Simulator(partitions, gap_s=settings.session_gap_seconds, seed=seed)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=10
    )
    await producer.start()
    stats = stats if stats is not None else {}
    stats["events"] = 0
    tick_s = 0.2
    started = time.monotonic()
    try:
        while duration <= 0 or time.monotonic() - started < duration:
            tick_started = time.monotonic()
            count = max(1, round(rate * tick_s))
            events = sim.events(int(time.time() * 1000), count)
            for record in sim.records(events):
                await producer.send(
                    settings.events_topic, record.value, key=record.key, partition=record.partition
                )
            stats["events"] += len(events)
            await asyncio.sleep(max(0.0, tick_s - (time.monotonic() - tick_started)))
        await producer.flush()
    finally:
        await producer.stop()
    return stats["events"]


@main.command()
@click.option("--rate", type=float, default=200.0, show_default=True, help="Simulated events/s")
@click.option("--web-port", type=int, default=6066, show_default=True, help="Port of /metrics")
def demo(rate: float, web_port: int) -> None:
    """Embedded broker + Redis + a worker + simulated traffic, with live KPIs. Ctrl-C stops all."""
    from agents.demo import run_demo

    sys.exit(run_demo(rate=rate, web_port=web_port, workdir=Path(".kpi-demo")))


@main.command()
@click.option("--quick", is_flag=True, help="Small sizes (a smoke run, not for the figures)")
def bench(quick: bool) -> None:
    """Throughput, latency, memory and /metrics time against baselines (see docs/performance.md)."""
    from agents.bench import run

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers it started
    run(quick=quick)


main.add_command(alerts)

if __name__ == "__main__":
    main()
