"""Guarantee 4: the broker is unavailable for a while, then back; the worker resumes by itself.

The embedded broker keeps its log in memory, so killing it would lose the topic. Two outages keep
the data instead:

- ``down``: the clients reach the broker through a proxy (the address it advertises), which is
  cut: every connection reset, every new one refused, as when the broker's host is down;
- ``frozen``: the broker process is stopped (SIGSTOP), as when it hangs or the network drops
  packets: connections stay open, nothing answers, requests and heartbeats time out;
- ``writes``: the broker refuses the worker's writes only (the proxy resets connections that
  send a Produce request), as Kafka does for ``acks=all`` producers when too few replicas are in
  sync, while fetches go on: the worker keeps receiving records whose dead letters it cannot
  write, and must neither ack them nor count them before it can.

The outage lands mid-stream; the traffic holds malformed records, so the worker has dead letters
to publish. Within 60 s of the broker's return the worker must have caught up, exactly, in the
same process (no restart), and every malformed record must be in the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer

from tests.chaos.harness import (
    ITERATIONS,
    WORKER,
    Background,
    Planned,
    assert_exact,
    landed,
    processed,
    rng_for,
    started,
    traffic,
    wait_for,
)
from tests.chaos.proxy import ProxiedBroker
from tests.conftest import Deployment

pytestmark = pytest.mark.integration

FAST_OUTAGE_S = 12.0  # longer than the worker's Kafka request timeout (10 s)
CHAOS_OUTAGE_S = 30.0
RESUME_WITHIN_S = 60.0
KINDS = ("down", "writes", "frozen")
PROFILES = [
    pytest.param(("down", FAST_OUTAGE_S, 0), id="down-fast"),
    pytest.param(("writes", FAST_OUTAGE_S, 0), id="writes-fast"),
    *(
        pytest.param(
            (kind, CHAOS_OUTAGE_S, i + 1), id=f"{kind}-chaos{i + 1}", marks=pytest.mark.chaos
        )
        for i in range(ITERATIONS)
        for kind in KINDS
    ),
]


def with_bad_records(planned: list[Planned], every: int = 25) -> list[Planned]:
    """The traffic with an invalid-JSON record after every ``every`` records (dead letters)."""
    out: list[Planned] = []
    for i, record in enumerate(planned):
        out.append(record)
        if i % every == every - 1:
            out.append((b"bad", record[1], b'{"event_id": "oops", '))
    return out


def bad_positions(planned: list[Planned]) -> set[tuple[int, int]]:
    """``(partition, offset)`` of the malformed records."""
    offsets: defaultdict[int, int] = defaultdict(int)
    out = set()
    for key, partition, _value in planned:
        if key == b"bad":
            out.add((partition, offsets[partition]))
        offsets[partition] += 1
    return out


async def dead_letter_positions(bootstrap: str, topic: str, want: int) -> set[tuple[int, int]]:
    """``(source partition, source offset)`` of the dead letters (at least ``want`` records)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    found: set[tuple[int, int]] = set()
    try:
        deadline = time.monotonic() + 30
        while len(found) < want and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    headers = dict(record.headers)
                    partition = int(headers["kpi.source.partition"])
                    found.add((partition, int(headers["kpi.source.offset"])))
    finally:
        await consumer.stop()
    return found


@pytest.mark.parametrize("profile", PROFILES)
def test_broker_outage_then_resumes_by_itself(
    own_broker: ProxiedBroker, deployment: Deployment, profile: tuple[str, float, int]
) -> None:
    kind, outage_s, seed = profile
    rng = rng_for(4000 + seed)
    deployment.env["KPI_KAFKA_BOOTSTRAP"] = own_broker.bootstrap
    planned = with_bad_records(traffic(seconds=240 if seed == 0 else 480, rate=40, seed=seed))
    worker = started(deployment.worker(**WORKER))
    pid = worker.proc.pid if worker.proc else None
    feed = Background(deployment, planned, len(planned) / (outage_s + 7))
    wait_for(lambda: processed(worker) > 0, 60, "the worker made no progress")
    time.sleep(rng.uniform(0.5, 2.0))
    assert own_broker.pid is not None
    print(f"outage: broker {kind} for {outage_s} s")
    if kind == "down":
        own_broker.proxy.cut()
    elif kind == "writes":
        own_broker.proxy.refuse_writes = True
    else:
        os.kill(own_broker.pid, signal.SIGSTOP)
    try:
        time.sleep(outage_s)
    finally:
        if kind == "down":
            own_broker.proxy.restore()
        elif kind == "writes":
            own_broker.proxy.refuse_writes = False
        else:
            os.kill(own_broker.pid, signal.SIGCONT)
    assert feed.running, "the traffic should outlast the outage"
    back = time.monotonic()
    feed.join()
    planned = landed(deployment, planned)
    samples = assert_exact(worker, deployment, planned, timeout_s=RESUME_WITHIN_S)
    print(f"caught up {time.monotonic() - back:.1f} s after the broker came back")
    assert worker.proc is not None and worker.proc.pid == pid and worker.proc.poll() is None
    bad = bad_positions(planned)
    letters = asyncio.run(
        dead_letter_positions(own_broker.bootstrap, deployment.env["KPI_DLQ_TOPIC"], len(bad))
    )
    assert letters == bad, f"{len(bad - letters)} malformed records missing from the DLQ"
    if kind == "writes":  # the refused writes were seen and retried, not slept through
        assert (samples.get("kpi_store_retries_total", {}).get(frozenset()) or 0) > 0
