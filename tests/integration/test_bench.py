"""``kpi bench``: its latency measurement (every tick counted, on traffic of a running campaign),
its worker rate, and its table's verdict on each target."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from agents.bench import (
    create_topics,
    envelopes,
    latency,
    lean,
    observe,
    print_table,
    produce,
    produce_to_visible,
    run_baseline,
    simulated_events,
    worker_rate,
)
from agents.embedded import EmbeddedBroker, EmbeddedRedis


def test_each_tick_is_visible_at_the_first_poll_that_counts_it() -> None:
    sent = [(1.0, 100.0), (2.0, 200.0)]
    seen = [(0.9, 100.0), (1.5, 100.0), (2.25, 150.0), (2.5, 200.0)]
    # A poll before a tick was produced never counts for it, even when it already shows as many
    # events (here the first tick's): 1.5 is that tick's first poll.
    assert produce_to_visible(sent, seen) == ([0.5, 0.5], 0)


def test_a_poll_is_timed_when_its_answer_comes_not_when_it_was_asked() -> None:
    # A scrape of a loaded worker takes up to a second: what it counts was visible by its end.
    now = [10.0]

    def slow_scrape() -> float:
        now[0] += 0.7
        return 500.0

    assert observe(slow_scrape, clock=lambda: now[0]) == (10.7, 500.0)


def test_a_tick_never_seen_counts_as_the_longest_wait_not_left_out() -> None:
    sent = [(1.0, 100.0), (2.0, 200.0), (3.0, 300.0)]
    seen = [(1.5, 100.0), (9.0, 200.0)]
    delays, unseen = produce_to_visible(sent, seen)
    assert unseen == 1
    assert delays == [0.5, 6.0, 7.0]  # the unseen tick: at least until the last poll


@pytest.mark.integration
def test_latency_runs_on_a_running_campaign_and_counts_every_tick(
    broker: EmbeddedBroker, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    result = latency(
        broker.bootstrap, redis_server.url, rate=2000, duration_s=2, workdir=tmp_path, history_s=5
    )
    assert result["samples"] == 20  # 0.1 s ticks
    assert result["unseen"] == 0
    assert result["history_events"] == 10_000  # 5 s of the campaign before the timed part
    assert 0 < result["p50_s"] <= result["p99_s"] < 10
    # With its history, the campaign's visitors come back (about half the events here); without
    # it, nearly every timed event would be a new visitor's (0.95 measured).
    assert 0.2 < result["new_visitor_share"] < 0.7
    assert 1500 < result["achieved_events_per_s"] < 2500


@pytest.mark.integration
def test_the_lean_ceiling_counts_every_event_of_single_and_enveloped_records(
    broker: EmbeddedBroker,
) -> None:
    events = simulated_events(3_000)
    asyncio.run(create_topics(broker.bootstrap, ["lean-single", "lean-envelope"]))
    single = [(str(e["visitor_id"]).encode(), None, orjson.dumps(e)) for e in events]
    asyncio.run(produce(broker.bootstrap, "lean-single", single))
    enveloped = [(None, p, v) for p, v in envelopes(events)]
    asyncio.run(produce(broker.bootstrap, "lean-envelope", enveloped))
    for topic in ("lean-single", "lean-envelope"):
        group = {"BENCH_GROUP": f"lean-test-{topic}"}
        counted, seconds = run_baseline(
            "agents.bench_lean", broker.bootstrap, topic, len(events), group, timeout_s=120
        )
        assert counted == len(events)
        assert seconds > 0
    # The bench's figure: the same loop in a process of its own, as events/s.
    assert 0 < lean(broker.bootstrap, "lean-single", len(events)) < float("inf")


@pytest.mark.integration
def test_a_worker_rate_is_timed_from_its_first_fetch(
    broker: EmbeddedBroker, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    events = simulated_events(3_000)
    asyncio.run(create_topics(broker.bootstrap, ["rate"]))
    asyncio.run(produce(broker.bootstrap, "rate", [(None, p, v) for p, v in envelopes(events)]))
    started = time.perf_counter()
    rate = worker_rate(broker.bootstrap, redis_server.url, "rate", len(events), tmp_path)
    elapsed = time.perf_counter() - started  # the worker's start and group join included
    # Timed from its first fetch, not from its first commit: never the events over no time.
    assert len(events) / elapsed < rate < float("inf")


def test_the_table_says_whether_each_target_is_met_by_the_unrounded_figure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    latency_at = {
        "achieved_events_per_s": 40_000.0,
        "new_visitor_share": 0.2,
        "p50_s": 0.9,
        "p99_s": 2.004,  # prints as 2,004 ms
        "unseen": 0,
    }
    print_table(
        {
            "machine": "x86_64, 2 cores",
            "events": 500_000,
            "lean_events_per_s": 165_075.0,
            "lean_runs": [165_075.0],
            "faust_idiomatic_records_per_s": 3_000.0,
            "worker_single_events_per_s": 15_000.0,
            "ratio_single_vs_faust": 5.0,
            "worker_envelope_events_per_s": 82_536.0,
            "worker_envelope_runs": [82_536.0],
            "ratio_envelope_vs_lean": 0.49998,  # prints as 0.50
            "two_workers_envelope_events_per_s": 100_000.0,
            "latency": {**latency_at, "share_of_envelope_rate": 0.5},
            "latency_quarter": {**latency_at, "share_of_envelope_rate": 0.25},
            "memory": {
                "bytes_per_open_visit": 300.4,  # prints as 300
                "worker_bytes_per_visit": 200.0,
                "redis_bytes_per_visit": 100.4,
                "open_visits": 1_000_000,
            },
            "metrics_render": {"median_s": 0.1, "first_s": 0.2, "campaigns": 1_000},
        }
    )
    table = capsys.readouterr().out
    assert "0.50 x lean (target >= 0.5: not met)" in table
    assert "1.21 x one worker, 0.61 x lean" in table  # two workers, against both
    assert "5.00 x faust-idiomatic (target >= 5: met)" in table
    assert "target p99 <= 2 s: not met" in table
    assert "300 bytes" in table and "(target <= 300: not met)" in table
    assert "100.0 ms" in table and "(target <= 100 ms: met)" in table
