"""Guarantee 6: bad input changes no KPI, lands in the dead-letter topic with its reason, and never
stops, crashes or slows the worker.

The corpus is mixed into valid traffic. Expected reasons are written here, by hand, one per dead
letter; the KPIs are checked three ways: the worker equals the truth of the whole input; the truth
of the whole input equals the truth of its valid part alone (so the bad records changed nothing);
and every bad record or event is in the dead-letter topic with the expected reason.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from stream.partitioner import partition_for
from tests.chaos.harness import (
    PARTITIONS,
    WORKER,
    Planned,
    assert_exact,
    expected_samples,
    mismatches,
    publish,
    started,
    traffic,
    truth,
)
from tests.conftest import Deployment

pytestmark = pytest.mark.integration

Bad = tuple[Planned, list[tuple[str, int | None]]]
"""A record and its dead letters: reason and index in the envelope (``None``: the whole record)."""


def visitor_on(partition: int, name: str) -> str:
    """A visitor id whose home partition is ``partition``."""
    return next(
        f"{name}{i}" for i in range(10_000) if partition_for(f"{name}{i}", PARTITIONS) == partition
    )


def event(
    event_id: str, ts: Any, visitor: str, kind: str = "page_view", **extra: Any
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "type": kind,
        "ts": ts,
        "campaign_id": "bad-input",
        "visitor_id": visitor,
        **extra,
    }


def corpus(
    t0_ms: int, now_ms: int, duplicate: Planned
) -> tuple[list[Bad], list[Planned], list[Planned]]:
    """The bad records (with their dead letters), the odd but valid ones, and the valid events
    the bad records hold (as records of their own)."""
    v = [visitor_on(p, "bad") for p in range(PARTITIONS)]
    ts = t0_ms + 30_000

    def rec(p: int, value: bytes | None, reason: str, *in_envelope: int) -> Bad:
        letters = [(reason, i) for i in in_envelope] if in_envelope else [(reason, None)]
        return (b"bad", p, value), letters  # type: ignore[return-value]  # None: a tombstone

    def js(obj: Any) -> bytes:
        return orjson.dumps(obj)

    no_campaign = {k: x for k, x in event("m1", ts, v[0]).items() if k != "campaign_id"}
    no_ts = {k: x for k, x in event("m2", ts, v[1]).items() if k != "ts"}
    nested = (
        b'{"event_id":"n1","type":"page_view","ts":%d,"campaign_id":"c","visitor_id":"%s",'
        b'"extra":%s%s}' % (ts, v[2].encode(), b"[" * 300, b"]" * 300)
    )
    bad: list[Bad] = [
        rec(0, b'{"event_id": "x", ', "invalid_json"),
        rec(1, b'\xff\xfe{"event_id": "x"}', "invalid_utf8"),
        rec(2, b'"just a string"', "not_an_object"),
        rec(3, b"42", "not_an_object"),
        rec(0, b'[1, "a", null]', "not_an_object", 0, 1, 2),
        rec(0, js(no_campaign), "missing_field"),
        rec(1, js(no_ts), "missing_field"),
        rec(2, js(event("t1", ts, 123)), "invalid_field"),
        rec(3, js(event("t2", ts, v[3], logged_in="yes")), "invalid_field"),
        rec(0, js(event("", ts, v[0])), "invalid_field"),
        rec(1, js(event("o1", "2026-01-01T10:00:00", v[1])), "bad_timestamp"),  # no offset
        rec(2, js(event("o2", "2026-13-45T10:00:00Z", v[2])), "bad_timestamp"),  # no such date
        rec(3, js(event("o3", -1, v[3])), "bad_timestamp"),
        rec(0, js(event("o4", 253_402_300_800_000, v[0])), "bad_timestamp"),  # year 10000
        rec(1, js(event("o5", 1.5e12, v[1])), "bad_timestamp"),  # a float
        rec(2, js(event("f1", now_ms + 86_400_000, v[2])), "bad_timestamp"),  # far future
        rec(3, js(event("u1", ts, v[3], kind="purchase")), "unknown_type"),
        rec(0, js(event("big", ts, v[0], page="p" * 10_000_000)), "too_large"),  # 10 MB
        rec(1, None, "not_an_object"),  # tombstone
        rec(2, b"[" * 100_000, "invalid_json"),  # nested deeper than any parser allows
        rec(3, nested, "invalid_json"),  # nested deeper than can be re-encoded
        # One bad event in an envelope: that event only.
        rec(0, js([event("ok1", ts, v[0]), {"event_id": "b1", "ts": ts}]), "missing_field", 1),
    ]
    odd: list[Planned] = [
        (None, 1, b"[]"),  # an empty envelope: nothing
        duplicate,  # an event_id already counted: a duplicate, no DLQ
        (v[3].encode(), 3, js(event("late1", t0_ms - 7_200_000, v[3]))),  # very late: counted
        # 10,000 events in one envelope, all valid.
        (
            None,
            0,
            js(
                [
                    event(f"env{i}", ts + i, visitor_on(0, f"env{i % 50}-"), kind="interaction")
                    for i in range(10_000)
                ]
            ),
        ),
    ]
    inside_bad = [(v[0].encode(), 0, js(event("ok1", ts, v[0])))]
    return bad, odd, inside_bad


async def dead_letters(bootstrap: str, topic: str, want: int) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=32 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + 30
        while len(out) < want and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


def test_bad_input_changes_no_kpi_and_lands_in_the_dlq(deployment: Deployment) -> None:
    valid = traffic(seconds=120, rate=40, seed=66)
    first = orjson.loads(valid[0][2])
    first = first[0] if isinstance(first, list) else first  # the first event, sent again later
    duplicate = (first["visitor_id"].encode(), valid[0][1], orjson.dumps(first))
    bad, odd, inside_bad = corpus(first["ts"], int(time.time() * 1000), duplicate)
    half = len(valid) // 2
    planned = valid[:half] + [record for record, _ in bad] + odd + valid[half:]
    good_only = valid[:half] + inside_bad + odd + valid[half:]

    # The bad records change nothing: the truth with them equals the truth without them.
    redis_url = deployment.env["KPI_REDIS_URL"]
    with_bad, without_bad = (expected_samples(truth(p), redis_url) for p in (planned, good_only))
    with_bad.pop("kpi_events_rejected_total")
    without_bad.pop("kpi_events_rejected_total")
    assert not mismatches(without_bad, with_bad)

    worker = started(deployment.worker(**WORKER))
    assert worker.proc is not None
    pid = worker.proc.pid
    env = deployment.env
    asyncio.run(publish(env["KPI_KAFKA_BOOTSTRAP"], env["KPI_EVENTS_TOPIC"], planned))
    samples = assert_exact(worker, deployment, planned)  # lag back to 0, every KPI exact

    # Every rejection counted under its reason, and in the DLQ with it.
    want = Counter(reason for _, letters in bad for reason, _index in letters)
    got = {
        dict(labels)["reason"]: value
        for labels, value in samples["kpi_events_rejected_total"].items()
        if value
    }
    assert got == want
    offsets: defaultdict[int, int] = defaultdict(int)
    expected: dict[tuple[int, int, int | None], str] = {}
    letters_of = {id(record): letters for record, letters in bad}
    for record in planned:
        partition = record[1]
        for reason, index in letters_of.get(id(record), []):
            expected[partition, offsets[partition], index] = reason
        offsets[partition] += 1
    letters = asyncio.run(
        dead_letters(env["KPI_KAFKA_BOOTSTRAP"], env["KPI_DLQ_TOPIC"], len(expected))
    )
    found = {}
    for letter in letters:
        h = {k: v.decode() for k, v in letter.headers}
        index = int(h["kpi.source.index"]) if "kpi.source.index" in h else None
        found[int(h["kpi.source.partition"]), int(h["kpi.source.offset"]), index] = h[
            "kpi.error.reason"
        ]
    assert found == expected

    # The same process all along, which never crashed.
    assert worker.proc.poll() is None and worker.proc.pid == pid
    log = worker.log_tail(100_000)
    assert "Traceback" not in log and "Crashed" not in log, log[-3000:]
