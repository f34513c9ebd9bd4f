"""The "faust-idiomatic" baseline of ``kpi bench``: what a user would write from Faust's docs.

One event per record, a ``faust.Record`` model, an ``async for`` per event, a table increment per
event. Run as ``python -m agents.bench_faust_baseline`` with ``BENCH_*`` variables; it prints
``DONE <records> <seconds>`` when it has counted ``BENCH_RECORDS`` records, then exits.
"""

from __future__ import annotations

import os
import sys
import time

import faust


class PageEvent(faust.Record, serializer="json"):
    """An event, as the docs would model it."""

    event_id: str
    type: str
    ts: int
    campaign_id: str
    visitor_id: str


def main() -> None:
    """Run the baseline worker until it has seen every record."""
    expected = int(os.environ["BENCH_RECORDS"])
    app = faust.App(
        os.environ["BENCH_GROUP"],
        broker=f"kafka://{os.environ['BENCH_BOOTSTRAP']}",
        store="memory://",
        web_enabled=False,
        topic_disable_leader=True,
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        datadir=os.environ["BENCH_DATADIR"],
        topic_partitions=int(os.environ["BENCH_PARTITIONS"]),
    )
    topic = app.topic(os.environ["BENCH_TOPIC"], value_type=PageEvent)
    counts = app.Table("counts", default=int, partitions=int(os.environ["BENCH_PARTITIONS"]))
    state = {"n": 0, "t0": 0.0}

    @app.agent(topic)
    async def count(events: faust.StreamT[PageEvent]) -> None:
        async for event in events:
            if state["n"] == 0:
                state["t0"] = time.perf_counter()
            counts[event.campaign_id + ":" + event.type] += 1
            state["n"] += 1
            if state["n"] >= expected:
                print(f"DONE {state['n']} {time.perf_counter() - state['t0']:.3f}", flush=True)
                os._exit(0)

    sys.argv = [sys.argv[0], "worker", "-l", "warn"]
    app.main()


if __name__ == "__main__":
    main()
