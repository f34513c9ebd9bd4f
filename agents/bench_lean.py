"""The "lean" ceiling of ``kpi bench``: an aiokafka ``getmany`` + orjson + dict loop.

It decodes and counts, nothing else. Run as ``python -m agents.bench_lean`` with ``BENCH_*``
variables, in a process of its own as the worker and the Faust baseline are: in the bench's
process, the 500,000 simulated events it holds made every full collection of Python's garbage
collector walk them, and the loop ran a quarter to a third slower (245,000-262,000 events/s
against 334,000-364,000 with the same events freed or frozen, measured here). It prints
``DONE <events> <seconds>`` once it has counted ``BENCH_RECORDS`` events, timed from its first
fetch that returned records.
"""

from __future__ import annotations

import asyncio
import os
import time

import orjson
from aiokafka import AIOKafkaConsumer


async def lean(bootstrap: str, topic: str, group: str, expected: int) -> tuple[int, float]:
    """Count events by ``(campaign, type)`` until ``expected``: (events, seconds)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=group,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    counts: dict[tuple[str, str], int] = {}
    seen = 0
    started = 0.0
    try:
        while seen < expected:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if batch and not started:
                started = time.perf_counter()
            for records in batch.values():
                for record in records:
                    decoded = orjson.loads(record.value)
                    for event in decoded if isinstance(decoded, list) else (decoded,):
                        key = (event["campaign_id"], event["type"])
                        counts[key] = counts.get(key, 0) + 1
                        seen += 1
    finally:
        await consumer.stop()
    return sum(counts.values()), time.perf_counter() - started


def main() -> None:
    env = os.environ
    events, seconds = asyncio.run(
        lean(
            env["BENCH_BOOTSTRAP"],
            env["BENCH_TOPIC"],
            env["BENCH_GROUP"],
            int(env["BENCH_RECORDS"]),
        )
    )
    print(f"DONE {events} {seconds:.6f}", flush=True)


if __name__ == "__main__":
    main()
