"""The Faust application: a consuming task over the events topic, a timer, and ``/metrics``.

The task drains the topic channel's queue in batches (a Faust ``Stream`` costs per record, and a
record may carry many events), hands them to :class:`BatchProcessor`, and acks them only after
their effects are durable in the store. Faust then commits those offsets; the store keeps its own
applied offset per partition, which is what makes replays harmless. Faust provides the consumer
group, rebalances, offset commits, the web server and the worker's lifecycle.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import threading
from typing import Any, cast

import faust
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from agents.consumer import BulkConsumer, BulkTransport, RecordBuffer
from agents.kafka import Publisher
from agents.metrics import WorkerMetrics
from agents.processor import BatchProcessor
from agents.redis_client import connect
from agents.redis_store import RedisStore
from agents.settings import Settings
from stream.partition import Record

log = logging.getLogger(__name__)

# aiohttp takes the charset apart from the content type; the text is UTF-8 (its default).
_CONTENT_TYPE = CONTENT_TYPE_LATEST.split(";")[0] + "; version=0.0.4"

# A stopping worker exits by this time whatever it is waiting for (see _App.on_stop).
SHUTDOWN_GRACE_S = 8.0

# Batches handled at once by the consuming task (see ``events`` in create_app).
_BATCHES_IN_FLIGHT = 2

# The cyclic collector's thresholds (see ``_tune_gc``): a collection of the youngest generation
# after this many new container objects (Python's default, 700, is about 40 per batch), and of
# the older ones after this many of the one before. Above what two batches in flight hold at
# once: with 50,000, 10-17 collections per million envelope events walked batches still in use
# (0.4-1.0 s of CPU, pauses up to 157 ms); with 200,000, one at start-up, none after.
_GC_THRESHOLD = (200_000, 20, 10)


class _App(faust.App):
    """Faust's app, with bulk delivery of the events topic and a shutdown that cannot hang.

    Its consumer is :class:`agents.consumer.BulkConsumer`, which puts each fetch of the events
    topic in :attr:`records` in one step (see that module for why).

    Faust's own shutdown can wait for the broker without bound: with the broker unreachable its
    consumer thread fails while stopping and the worker never exits. Exiting abruptly instead is
    safe here: records are acknowledged only once their effects are durable, so a cut-short
    shutdown is exactly a SIGKILL, which replays the unacknowledged records and nothing else.
    """

    records: RecordBuffer
    bulk_topic: str
    fetch_max_wait_ms: int

    def _new_transport(self) -> Any:
        return BulkTransport(self.conf.broker_consumer, self)

    def _new_consumer(self) -> Any:
        consumer = cast(BulkConsumer, super()._new_consumer())
        consumer.buffer = self.records
        consumer.bulk_topic = self.bulk_topic
        consumer.fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer

    async def on_stop(self) -> None:
        _exit_after(SHUTDOWN_GRACE_S)
        await super().on_stop()


def _exit_after(grace_s: float) -> None:
    """End the process in ``grace_s`` seconds unless it has exited by then."""

    def expire() -> None:
        log.error(
            "shutdown not finished after %.0f s (broker or store not answering): exiting now; "
            "unacknowledged records are replayed by the next worker",
            grace_s,
        )
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(grace_s, expire)
    timer.daemon = True  # never keeps a process alive that exited in time
    timer.start()


def create_app(settings: Settings, partitions: int) -> faust.App:
    """Build the worker's Faust app.

    Args:
        settings: The worker's settings.
        partitions: Partitions of the events topic (see :func:`agents.kafka.ensure_topics`).
    """
    app = _App(
        settings.group_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        datadir=settings.data_dir,
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        # /metrics is served from a thread of its own (its own event loop and Redis client):
        # on the main loop, each of a scrape's reads waited behind the steps in flight, and a
        # scrape of a loaded worker took 0.25-1.25 s (docs/performance.md, twentieth round).
        web_in_thread=True,
        broker_session_timeout=settings.broker_session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, settings.broker_session_timeout_seconds / 3),
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        # Waiting for stream buffers to drain is what kept a naive worker alive for minutes after
        # SIGTERM; unacked records are simply replayed (and skipped by offset if applied).
        stream_wait_empty=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        topic_partitions=partitions,
        producer_max_request_size=16 * 1024 * 1024,
        # Per partition and fetch: bounds what the consumer holds fetched (a larger record still
        # comes whole: Kafka, and Tansu, return a first record batch over the limit).
        consumer_max_fetch_size=1024 * 1024,
        broker_max_poll_records=10_000,  # bigger fetches: fewer hand-offs from the consumer thread
        logging_config=None,
    )
    app.bulk_topic = settings.events_topic
    app.fetch_max_wait_ms = settings.fetch_max_wait_ms
    # Fetched and not yet processed: a batch's worth, so the next one is there when one ends.
    app.records = RecordBuffer(settings.batch_max_records, settings.batch_max_bytes)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)

    def new_store() -> RedisStore:
        """A store with a Redis client of its own."""
        return RedisStore(
            connect(settings.redis_url, socket_timeout=10, socket_connect_timeout=5),
            partitions,
            settings.redis_prefix,
            settings.hll_retention_seconds,
            settings.scrape_cache_max_age_seconds,
        )

    store = new_store()
    # The web thread's: an asyncio client belongs to the loop it first runs in. It only reads,
    # and its connections close with the process.
    scrapes = new_store()
    publisher = Publisher(settings)

    def committed(partition: int) -> int | None:
        # The group's committed offset (next offset to read) as Faust's consumer knows it: read
        # from Kafka at assignment, updated at each commit. A private attribute: Faust has no
        # public accessor. A missing value only disables this check (the marker check remains).
        offsets = getattr(app.consumer, "_committed_offset", {})
        offset = offsets.get(faust.types.TP(settings.events_topic, partition))
        return offset if isinstance(offset, int) else None

    processor = BatchProcessor(store, publisher, settings, partitions, metrics, committed=committed)
    topic = app.topic(
        settings.events_topic,
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        internal=False,
    )

    # Iterating the topic registers it with Faust's conductor, which subscribes the consumer to
    # it; its records then arrive in ``app.records`` (see agents.consumer), not on this channel.
    topic.__aiter__()

    @app.task  # type: ignore[untyped-decorator]
    async def events() -> None:
        """The consuming loop: batches of records from the consumer, acked once durable.

        Two batches are in flight: while one waits on Redis, the next is decoded and applied.
        Each partition's steps still run in order: they queue on the partition's lock in the
        order the batches were taken (``asyncio.Lock`` is first come, first served).
        """
        _tune_gc()
        _fix_mmap_threshold()
        take = app.records.take
        max_records, within_s = settings.batch_max_records, settings.batch_within_ms / 1000
        max_bytes = settings.batch_max_bytes
        consumer = app.consumer
        slots = asyncio.Semaphore(_BATCHES_IN_FLIGHT)
        in_flight: set[asyncio.Task[None]] = set()

        async def handle(batch: list[Any]) -> None:
            try:
                await processor.handle([_record(message) for message in batch])
                for message in batch:
                    message.ack(consumer)
            finally:
                slots.release()

        try:
            while True:
                await slots.acquire()
                for task in [task for task in in_flight if task.done()]:
                    in_flight.discard(task)
                    task.result()  # a batch that failed fails this task, as it did before
                batch = await take(max_records, max_bytes, within_s)
                # Fetched before a rebalance: Faust has sought back and fetches them again.
                generation = app.consumer_generation_id
                batch = [message for message in batch if message.generation_id == generation]
                in_flight.add(asyncio.create_task(handle(batch)))
        finally:
            for task in in_flight:
                task.cancel()

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def idle_advance() -> None:
        await processor.check_store()  # first: advance_idle may wait on a held partition
        await processor.advance_idle()
        _trim_heap()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, assigned: Any, **_: Any) -> None:
        processor.assigned = {tp.partition for tp in assigned if tp.topic == settings.events_topic}
        # Faust seeks every assigned partition back to its committed offset: what the buffer
        # holds is fetched again (and what was applied meanwhile is skipped by the store offset).
        app.records.drop()
        processor.forget(p for p in list(processor.states) if p not in processor.assigned)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, revoked: Any, **_: Any) -> None:
        gone = {tp.partition for tp in revoked if tp.topic == settings.events_topic}
        processor.forget(gone)
        app.records.drop(gone)

    @app.page("/metrics")
    async def metrics_page(web: View, request: Request) -> Response:
        try:
            snapshot = await scrapes.read()
        except Exception as exc:  # the store is down: still serve the worker's own health
            log.warning("metrics: cannot read the store: %s", exc)
            snapshot = None
        metrics.store.snapshot = snapshot
        if snapshot is not None:
            # A copy (one step under the GIL): a rebalance changes the set on the main thread.
            owned = set(processor.assigned)
            _update_lag(app, metrics, snapshot.offsets, owned, settings.events_topic)
        return web.bytes(metrics.render(), content_type=_CONTENT_TYPE)

    @app.task  # type: ignore[untyped-decorator]
    async def announce() -> None:
        log.info(
            "kpi worker: topic %s (%d partitions), store %s, metrics http://%s:%d/metrics",
            settings.events_topic,
            partitions,
            _redacted(settings.redis_url),
            settings.web_host,
            settings.web_port,
        )

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def close(sender: Any, **_: Any) -> None:
        await publisher.stop()
        await store.redis.aclose()

    return app


def _tune_gc() -> None:
    """Make the cyclic garbage collector cheap for batch work (measured: 18 % of the worker's
    CPU with the defaults, on envelopes).

    A batch decodes tens of thousands of event objects that live until its commit: with the
    default thresholds, they trigger a collection every 700 of them, and full collections walk
    every object the worker has. Objects made while starting (Faust, the app, modules) are moved
    out of the collector's sight for good (``gc.freeze``); young collections run less often. The
    worker's objects rarely form reference cycles: the collector only has a little to find.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLD)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: nothing to tune
        return None


_LIBC = _load_libc()
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _fix_mmap_threshold() -> None:
    """Serve allocations of 256 KiB and more from their own mappings, freed back at once.

    glibc raises its threshold to the size of each mapped block freed (up to 32 MiB): after a
    few batches, record bytes and index arrays of a MiB or more come from the heap, where what
    they leave free stays resident (the worker's RSS then moves by tens of MB between runs).
    """
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc keeps it by default).

    A batch's record bytes and replies are large allocations made and freed at each batch; glibc
    keeps what they leave free, so the worker's resident memory would stay at its peak.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _record(message: Any) -> Record:
    """The domain's view of a Faust message."""
    headers = message.headers or ()
    if isinstance(headers, dict):
        headers = tuple(headers.items())
    return Record(message.partition, message.offset, message.key, message.value, tuple(headers))


def _update_lag(
    app: faust.App,
    metrics: WorkerMetrics,
    offsets: dict[int, int],
    assigned: set[int],
    topic: str,
) -> None:
    consumer = app.consumer
    metrics.consumer_lag.clear()  # partitions revoked since the last scrape go away
    for partition in assigned:
        try:
            highwater = consumer.highwater(faust.types.TP(topic, partition))
        except Exception:  # not fetched yet
            continue
        if highwater is not None:
            lag = max(0, highwater - offsets.get(partition, -1) - 1)
            metrics.consumer_lag.labels(str(partition)).set(lag)


def _redacted(url: str) -> str:
    """A URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
