"""Prometheus exposition: every metric of the worker, in one module, registry passed in.

KPIs live in the shared store, so they are exported by a custom collector fed with a snapshot read
from the store at scrape time: every worker of a group exports the same totals. With many
campaigns they are tens of thousands of samples, so the page writes them as text directly
(:mod:`agents.exposition`) rather than through the registry. Worker-local health (consumer lag,
flush latency, store retries) uses ordinary metrics, in the registry.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from agents import exposition
from agents.exposition import Family, Row
from stream.events import Reason
from stream.kpis import COUNTERS, WINDOW_KPIS, KpiSnapshot

REJECT_REASONS = tuple(r.value for r in Reason)


class StoreCollector(Collector):
    """Exports the KPIs and pipeline totals of the last snapshot read from the store.

    :meth:`render` writes them as text directly (:mod:`agents.exposition`): tens of thousands of
    samples with many campaigns. :meth:`collect` gives the same families to a registry.
    """

    def __init__(self) -> None:
        self.snapshot: KpiSnapshot | None = None
        self._rendered: tuple[KpiSnapshot | None, bytes] | None = None

    def collect(self) -> Iterator[Metric]:
        for family in self.families():
            yield family.metric()

    def render(self) -> bytes:
        """The text exposition of :meth:`families`.

        Snapshots are read-only (see :meth:`stream.store.Store.read`): the text of the snapshot
        rendered last is reused while the store returns that same snapshot.
        """
        snap = self.snapshot
        if self._rendered is None or self._rendered[0] is not snap:
            self._rendered = (snap, exposition.render(self.families()).encode())
        return self._rendered[1]

    def families(self) -> Iterator[Family]:
        """The store's metric families, from the last snapshot."""
        snap = self.snapshot
        up = 0 if snap is None else 1
        yield Family(
            "kpi_store_up",
            "1 when the last read of the shared store worked.",
            "gauge",
            (),
            [((), up)],
        )
        if snap is None:
            return
        yield from self._counters(snap)
        yield from self._windows(snap)
        yield from self._pipeline(snap)

    @staticmethod
    def _counters(snap: KpiSnapshot) -> Iterator[Family]:
        campaigns = sorted(snap.counters.items())
        for kpi in COUNTERS:
            counter, scale = kpi.counter, kpi.scale
            rows = [((campaign,), values.get(counter, 0) * scale) for campaign, values in campaigns]
            yield Family(kpi.name, kpi.help, "counter", ("campaign",), rows)

    @staticmethod
    def _windows(snap: KpiSnapshot) -> Iterator[Family]:
        rows: dict[str, list[Row]] = {kpi.name: [] for kpi in WINDOW_KPIS}
        for kpi, campaign, window, value in snap.window_values():
            rows[kpi.name].append(((campaign, window), value))
        for kpi in WINDOW_KPIS:
            yield Family(kpi.name, kpi.help, "gauge", ("campaign", "window"), rows[kpi.name])

    @staticmethod
    def _pipeline(snap: KpiSnapshot) -> Iterator[Family]:
        pipe = snap.pipeline
        for name, key, help_text in (
            ("kpi_events_processed", "processed", "Valid events counted (late ones included)."),
            ("kpi_events_duplicate", "duplicates", "Events whose event_id was already counted."),
            ("kpi_events_late", "late", "Events older than the watermark minus the lateness."),
            ("kpi_events_forwarded", "forwarded", "Events re-keyed to their visitor's partition."),
        ):
            yield Family(name, help_text, "counter", (), [((), pipe.get(key, 0))])
        yield Family(
            "kpi_events_rejected",
            "Events rejected to the dead-letter topic.",
            "counter",
            ("reason",),
            [((reason,), pipe.get(f"rejected:{reason}", 0)) for reason in REJECT_REASONS],
        )
        yield Family(
            "kpi_watermark_timestamp_seconds",
            "Event-time watermark of each partition (epoch seconds).",
            "gauge",
            ("partition",),
            [
                ((str(partition),), ms / 1000)
                for partition, ms in sorted(snap.watermarks_ms.items())
                if ms >= 0
            ],
        )
        newest = snap.newest_event_ms
        yield Family(
            "kpi_newest_event_timestamp_seconds",
            "Newest event time seen: where the KPI windows end (epoch seconds).",
            "gauge",
            (),
            [((), newest / 1000)] if newest >= 0 else [],
        )
        yield Family(
            "kpi_open_visits", "Visits not closed yet.", "gauge", (), [((), snap.open_visits)]
        )


class WorkerMetrics:
    """The metrics of one worker process, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Not registered: rendered directly, before the registry's own metrics (see render).
        self.store = StoreCollector()
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
        """The Prometheus text exposition: the store's families, then the registry's."""
        return self.store.render() + generate_latest(self.registry)
