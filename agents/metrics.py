"""Prometheus exposition: every metric of the worker, in one module, registry passed in.

KPIs live in the shared store, so they are exported by a custom collector fed with a snapshot read
from the store at scrape time: every worker of a group exports the same totals. Worker-local
health (consumer lag, flush latency, store retries) uses ordinary metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stream.events import Reason
from stream.kpis import COUNTERS, WINDOW_KPIS, KpiSnapshot

REJECT_REASONS = tuple(r.value for r in Reason)


class StoreCollector(Collector):
    """Exports the KPIs and pipeline totals of the last snapshot read from the store."""

    def __init__(self) -> None:
        self.snapshot: KpiSnapshot | None = None

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        up = GaugeMetricFamily("kpi_store_up", "1 when the last read of the shared store worked.")
        up.add_metric([], 0 if snap is None else 1)
        yield up
        if snap is None:
            return
        yield from self._counters(snap)
        yield from self._windows(snap)
        yield from self._pipeline(snap)

    @staticmethod
    def _counters(snap: KpiSnapshot) -> Iterator[Metric]:
        for kpi in COUNTERS:
            family = CounterMetricFamily(kpi.name, kpi.help, labels=["campaign"])
            for campaign, values in sorted(snap.counters.items()):
                family.add_metric([campaign], values.get(kpi.counter, 0) * kpi.scale)
            yield family

    @staticmethod
    def _windows(snap: KpiSnapshot) -> Iterator[Metric]:
        families = {
            kpi.name: GaugeMetricFamily(kpi.name, kpi.help, labels=["campaign", "window"])
            for kpi in WINDOW_KPIS
        }
        for kpi, campaign, window, value in snap.window_values():
            families[kpi.name].add_metric([campaign, window], value)
        yield from families.values()

    @staticmethod
    def _pipeline(snap: KpiSnapshot) -> Iterator[Metric]:
        pipe = snap.pipeline
        for name, key, help_text in (
            ("kpi_events_processed", "processed", "Valid events counted (late ones included)."),
            ("kpi_events_duplicate", "duplicates", "Events whose event_id was already counted."),
            ("kpi_events_late", "late", "Events older than the watermark minus the lateness."),
            ("kpi_events_forwarded", "forwarded", "Events re-keyed to their visitor's partition."),
        ):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], pipe.get(key, 0))
            yield family
        rejected = CounterMetricFamily(
            "kpi_events_rejected", "Events rejected to the dead-letter topic.", labels=["reason"]
        )
        for reason in REJECT_REASONS:
            rejected.add_metric([reason], pipe.get(f"rejected:{reason}", 0))
        yield rejected
        watermark = GaugeMetricFamily(
            "kpi_watermark_timestamp_seconds",
            "Event-time watermark of each partition (epoch seconds).",
            labels=["partition"],
        )
        for partition, ms in sorted(snap.watermarks_ms.items()):
            if ms >= 0:
                watermark.add_metric([str(partition)], ms / 1000)
        yield watermark
        newest = GaugeMetricFamily(
            "kpi_newest_event_timestamp_seconds",
            "Newest event time seen: where the KPI windows end (epoch seconds).",
        )
        if snap.newest_event_ms >= 0:
            newest.add_metric([], snap.newest_event_ms / 1000)
        yield newest
        open_visits = GaugeMetricFamily("kpi_open_visits", "Visits not closed yet.")
        open_visits.add_metric([], snap.open_visits)
        yield open_visits


class WorkerMetrics:
    """The metrics of one worker process, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.store = StoreCollector()
        registry.register(self.store)
        self.consumer_lag = Gauge(
            "kpi_consumer_lag",
            "Records of the partition not applied yet (high watermark - applied offset - 1).",
            ["partition"],
            registry=registry,
        )
        self.flush_seconds = Histogram(
            "kpi_flush_duration_seconds",
            "Time to make one partition batch durable (store look-up, publish, commit).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.store_retries = Counter(
            "kpi_store_retries",
            "Batches retried because the store or the broker failed.",
            registry=registry,
        )
        self.store_reset = Gauge(
            "kpi_store_reset_detected",
            "1 while the store is found to have lost acknowledged state (restarted empty, "
            "flushed): the worker then applies nothing.",
            registry=registry,
        )
        self.store_reset.set(0)
        self.fence_lost = Counter(
            "kpi_partition_fence_lost",
            "Commits refused because another worker had applied the partition meanwhile.",
            registry=registry,
        )
        self.batch_records = Histogram(
            "kpi_batch_records",
            "Records per partition batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=registry,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)
