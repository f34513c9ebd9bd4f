"""What every fault test shares: traffic, the truth re-derived from it, and the exactness check.

Modelled on Kafka Streams' EOS system tests and Flink's validating sink: the expected KPIs are not
hand-written but computed from the very records published, by the pure domain (``stream/``) and the
in-memory store, partition by partition, in one failure-free pass. A worker that went through
crashes, outages and rebalances must then show exactly the same thing:

- every store-derived sample of ``/metrics`` (counters, window gauges, pipeline totals,
  watermarks, open visits) equals the truth's, exactly: the truth's distinct counts are exact sets,
  turned into the estimates Redis's HyperLogLog gives for those very sets;
- per partition, the stored counters equal the truth's, and the counted event ids (their stored
  digests) are exactly the valid events of that partition: none lost, none unknown, none
  remembered twice (the validating sink).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry, generate_latest

from agents.metrics import StoreCollector
from agents.redis_dedup import digest, generation_keys, parse_generations
from agents.simulator import Simulator
from stream.partition import Limits, PartitionState, Record, candidate_ids, decode
from stream.partitioner import partition_for
from stream.store import MemoryStore
from stream.windows import WINDOWS, window_bucket_starts
from tests.conftest import Deployment, WorkerProcess, metric_samples

PARTITIONS = 4
GAP_S = 60
LATENESS_S = 600
IDENTITY_KEY = "test-identity-key"  # the deployment fixture's KPI_IDENTITY_KEY

# Worker settings of every fault test: event time only (no idle advance during a test), small
# batches so that a fault lands in the middle of many flushes.
WORKER = {
    "KPI_EVENTS_PARTITIONS": str(PARTITIONS),
    "KPI_SESSION_GAP_SECONDS": str(GAP_S),
    "KPI_ALLOWED_LATENESS_SECONDS": str(LATENESS_S),
    "KPI_IDLE_ADVANCE_SECONDS": "3600",
    "KPI_BATCH_MAX_RECORDS": "20",
}

Planned = tuple[bytes | None, int, bytes]
"""A record to publish: key, partition, value."""

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]

ITERATIONS = int(os.environ.get("KPI_CHAOS_ITERATIONS", "3"))


def profiles(fast: object, chaos: object) -> list[object]:
    """Parameters of a fault test: one fast run (``make test``), ITERATIONS slow ones (chaos)."""
    return [
        pytest.param((fast, 0), id="fast"),
        *(
            pytest.param((chaos, i + 1), id=f"chaos{i + 1}", marks=pytest.mark.chaos)
            for i in range(ITERATIONS)
        ),
    ]


def traffic(seconds: int, rate: int, seed: int, start_ms: int | None = None) -> list[Planned]:
    """Simulated traffic, one tick per event-time second, 3 h ago unless ``start_ms`` is given.

    Each tick gives one record per partition: an unkeyed envelope on the visitors' home partition,
    or a single keyed event (so no event needs re-keying: the truth is per partition).
    """
    sim = Simulator(PARTITIONS, gap_s=GAP_S, seed=seed)
    if start_ms is None:
        start_ms = int(time.time() * 1000) - 3 * 3_600_000
    planned: list[Planned] = []
    for tick in range(seconds):
        per_partition: dict[int, list[dict[str, object]]] = defaultdict(list)
        for event in sim.events(start_ms + tick * 1000, rate):
            per_partition[partition_for(str(event["visitor_id"]), PARTITIONS)].append(event)
        for partition, events in sorted(per_partition.items()):
            if len(events) == 1:
                key = str(events[0]["visitor_id"]).encode()
                planned.append((key, partition, orjson.dumps(events[0])))
            else:
                planned.append((None, partition, orjson.dumps(events)))
    return planned


def truth(planned: Sequence[Planned], lateness_s: int = LATENESS_S) -> MemoryStore:
    """The state the input implies: the pure domain over each partition's records, in one pass."""
    store = MemoryStore()
    by_partition: dict[int, list[Record]] = defaultdict(list)
    for key, partition, value in planned:
        records = by_partition[partition]
        records.append(Record(partition, len(records), key, value))
    limits = Limits(gap_ms=GAP_S * 1000, lateness_ms=lateness_s * 1000, idle_advance_s=3600)

    async def run() -> None:
        for partition, records in sorted(by_partition.items()):
            state = PartitionState(partition, PARTITIONS, limits, IDENTITY_KEY.encode())
            decoded = decode(records)
            seen = await store.seen(partition, candidate_ids(decoded))
            delta = state.apply(decoded, seen, time.time())
            await store.add_uniques(delta.uniques)
            assert await store.commit(delta, -1, 86_400_000)

    asyncio.run(run())
    return store


def expected_samples(store: MemoryStore, redis_url: str) -> Samples:
    """The ``/metrics`` samples a worker must show for ``store``'s state.

    Distinct counts are the HyperLogLog estimates of the truth's exact sets, computed by the
    Redis at ``redis_url`` in a scratch key (an HLL depends only on the set added to it).
    """
    snap = asyncio.run(store.read())
    client = redis.Redis.from_url(redis_url)
    scratch = f"chaos-scratch-{os.getpid()}"
    try:
        for (campaign, label), data in snap.windows.items():
            spec = next(w for w in WINDOWS if w.label == label)
            starts = window_bucket_starts(snap.newest_event_ms, spec)
            for kind in list(data.uniques):
                members: set[str] = set()
                for start in starts:
                    members |= store.uniques.get((campaign, kind, spec.bucket_ms, start), set())
                client.delete(scratch)
                if members:
                    client.pfadd(scratch, *members)
                data.uniques[kind] = int(client.pfcount(scratch))
        client.delete(scratch)
    finally:
        client.close()
    registry = CollectorRegistry()
    collector = StoreCollector()
    collector.snapshot = snap
    registry.register(collector)
    return metric_samples(generate_latest(registry).decode())


def mismatches(expected: Samples, actual: Samples) -> list[str]:
    """Every store-derived sample that differs (worker-local metrics are not compared)."""
    out = []
    for name, series in expected.items():
        got = actual.get(name, {})
        for labels in set(series) | set(got):
            want, have = series.get(labels), got.get(labels)
            if want == have:
                continue
            out.append(f"{name}{dict(labels)}: expected {want}, got {have}")
    return sorted(out)


def partition_state(url: str, prefix: str, partition: int) -> tuple[dict[str, int], list[bytes]]:
    """A partition's stored counters and counted event ids' digests (one per generation that
    holds it, so an id counted twice shows twice), read straight from Redis."""
    client = redis.Redis.from_url(url)
    try:
        counters = client.hgetall(f"{prefix}:{{p{partition}}}:cnt")
        generations = parse_generations(client.hget(f"{prefix}:{{p{partition}}}:meta", "seen"))
        pipe = client.pipeline(transaction=False)
        for generation in generations:
            for key in generation_keys(f"{prefix}:{{p{partition}}}:seen:", generation):
                pipe.get(key)
        digests = b"".join(s for s in pipe.execute() if s)
        seen = [digests[i : i + 16] for i in range(0, len(digests), 16)]
    finally:
        client.close()
    return {k.decode(): int(v) for k, v in counters.items()}, seen


def assert_exact(
    worker: WorkerProcess,
    deployment: Deployment,
    planned: Sequence[Planned],
    timeout_s: float = 90.0,
    lateness_s: int = LATENESS_S,
) -> Samples:
    """Wait until ``worker`` has applied every record, then check it against the truth."""
    store = truth(planned, lateness_s)
    env = deployment.env
    expected = expected_samples(store, env["KPI_REDIS_URL"])
    total_records = len(planned)

    def caught_up(m: Samples) -> bool:
        # Every partition's stored offset is its last record's: the lag gauge of the partitions
        # this worker owns is 0, and the processed total is the truth's.
        lag = m.get("kpi_consumer_lag", {})
        processed = m.get("kpi_events_processed_total", {}).get(frozenset())
        want = expected["kpi_events_processed_total"][frozenset()]
        return bool(lag) and not any(lag.values()) and processed == want

    try:
        actual = worker.wait_until(caught_up, timeout_s=timeout_s)
    except AssertionError:
        m = worker.scrape()
        pick = ("kpi_events_processed_total", "kpi_consumer_lag", "kpi_store_reset_detected")
        summary = {name: m.get(name) for name in pick}
        want = expected["kpi_events_processed_total"][frozenset()]
        raise AssertionError(
            f"not caught up in {timeout_s} s: expected {want} processed; {summary}\n"
            + worker.log_tail(15)
        ) from None
    problems = mismatches(expected, actual)
    assert not problems, f"{len(problems)} metrics differ from the truth:\n" + "\n".join(
        problems[:40]
    )
    for partition in range(PARTITIONS):
        counters, seen = partition_state(env["KPI_REDIS_URL"], env["KPI_REDIS_PREFIX"], partition)
        want_counters = {
            f"{campaign}\x1f{name}": value
            for (campaign, name), value in store.counters.get(partition, {}).items()
            if value
        }
        assert {k: v for k, v in counters.items() if v} == want_counters, f"partition {partition}"
        want_seen = {digest(i) for i in store.seen_ids.get(partition, {})}
        lost, unknown = want_seen - set(seen), set(seen) - want_seen
        twice = len(seen) - len(set(seen))
        assert not lost and not unknown and not twice, (
            f"partition {partition}: {len(lost)} events lost, {len(unknown)} unknown ids "
            f"counted, {twice} ids remembered twice"
        )
    assert total_records > 0
    return actual


async def publish(
    bootstrap: str,
    topic: str,
    planned: Sequence[Planned],
    records_per_s: float = 0.0,
) -> None:
    """Publish ``planned`` in order (at ``records_per_s`` when given, else as fast as possible)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        max_request_size=16 * 1024 * 1024,
        request_timeout_ms=120_000,  # survives a paused broker
        client_id="chaos-traffic",  # tests.chaos.proxy.TRAFFIC_CLIENT: never refused
    )
    await producer.start()
    try:
        started = time.monotonic()
        sends = []
        for i, (key, partition, value) in enumerate(planned):
            sends.append(await producer.send(topic, value, key=key, partition=partition))
            if records_per_s > 0:
                ahead_s = i / records_per_s - (time.monotonic() - started)
                if ahead_s > 0:
                    await asyncio.sleep(ahead_s)
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


def landed(deployment: Deployment, planned: Sequence[Planned]) -> list[Planned]:
    """The records in the deployment's events topic, partition by partition in offset order: the
    truth of a test whose traffic a broker outage cut.

    The traffic's producer is not idempotent (the embedded broker does not support it): a send
    cut after the broker appended it is sent again and lands twice. The worker rightly counts
    those events as duplicates (or a malformed record's second copy as a second rejection), so
    the truth is taken from what landed, not from what was planned.
    """
    env = deployment.env
    topic_records = _read_topic(env["KPI_KAFKA_BOOTSTRAP"], env["KPI_EVENTS_TOPIC"], len(planned))
    return asyncio.run(topic_records)


async def _read_topic(bootstrap: str, topic: str, want: int) -> list[Planned]:
    """Every record of ``topic``: at least ``want``, and until a poll finds no more."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    found: defaultdict[int, list[tuple[int, Planned]]] = defaultdict(list)
    try:
        deadline, count, more = time.monotonic() + 30, 0, True
        while (count < want or more) and time.monotonic() < deadline:
            batches = (await consumer.getmany(timeout_ms=500)).values()
            more = any(batches)
            for records in batches:
                for r in records:
                    found[r.partition].append((r.offset, (r.key, r.partition, r.value)))
                    count += 1
    finally:
        await consumer.stop()
    return [record for p in sorted(found) for _, record in sorted(found[p], key=lambda x: x[0])]


class Background:
    """Publishes records in a thread while the test injects faults."""

    def __init__(
        self, deployment: Deployment, planned: Sequence[Planned], records_per_s: float
    ) -> None:
        env = deployment.env
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run,
            args=(env["KPI_KAFKA_BOOTSTRAP"], env["KPI_EVENTS_TOPIC"], planned, records_per_s),
            daemon=True,
        )
        self._thread.start()

    def _run(
        self, bootstrap: str, topic: str, planned: Sequence[Planned], records_per_s: float
    ) -> None:
        try:
            asyncio.run(publish(bootstrap, topic, planned, records_per_s))
        except BaseException as exc:  # reported by join()
            self.error = exc

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float = 120.0) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the publisher did not finish"
        if self.error is not None:
            raise self.error


def processed(worker: WorkerProcess) -> float:
    """The worker's ``kpi_events_processed_total`` (0 when the store has none yet)."""
    try:
        return worker.scrape().get("kpi_events_processed_total", {}).get(frozenset(), 0.0)
    except OSError:
        return 0.0


def wait_for(
    condition: Callable[[], bool], timeout_s: float, message: str, poll_s: float = 0.1
) -> None:
    """Poll ``condition`` until true; fail with ``message`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise AssertionError(message)


def started(worker: WorkerProcess, timeout_s: float = 60.0) -> WorkerProcess:
    """Wait until the worker serves ``/metrics``."""
    worker.wait_until(lambda m: "kpi_store_up" in m, timeout_s=timeout_s)
    return worker


def rng_for(seed: int) -> random.Random:
    """The random source of one run (printed seed: a failing run can be replayed)."""
    print(f"fault schedule seed: {seed}")
    return random.Random(seed)
