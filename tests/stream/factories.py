"""Builders shared by the ``stream`` unit tests: events, records, and a worker-like batch loop.

The batch loop (:func:`load_state`, :func:`process`) does what the worker does around the pure
domain: load the partition from the store, ask which ids were already counted, apply, add the
distinct counts, then commit with the fence on the loaded offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from stream.partition import Delta, Limits, PartitionState, Record, candidate_ids, decode
from stream.store import MemoryStore

# 2023-11-14T22:00:00Z: aligned on the hour, so on every window bucket.
H_MS = 1_699_999_200_000
MIN_MS = 60_000
KEY = b"test-identity-key"
DEDUP_RETENTION_MS = 86_400_000


def event(
    event_id: str = "e1",
    type: str = "page_view",
    ts: Any = H_MS,
    campaign_id: str = "c1",
    visitor_id: str = "v1",
    **extra: Any,
) -> dict[str, Any]:
    """A valid v1 event object (``extra`` adds or overrides fields)."""
    obj: dict[str, Any] = {
        "event_id": event_id,
        "type": type,
        "ts": ts,
        "campaign_id": campaign_id,
        "visitor_id": visitor_id,
    }
    obj.update(extra)
    return obj


def dumps(value: Any) -> bytes:
    """JSON bytes of ``value``."""
    return orjson.dumps(value)


def record(
    offset: int,
    value: Any,
    key: bytes | str | None = "auto",
    partition: int = 0,
) -> Record:
    """A record of one event dict, a list of them (envelope), or raw bytes.

    ``key="auto"`` keys it by the (first) event's visitor, as the contract asks of producers.
    """
    if isinstance(value, bytes) or value is None:
        payload = value
        first = None
    else:
        payload = dumps(value)
        first = value[0] if isinstance(value, list) and value else value
    if key == "auto":
        key = first["visitor_id"].encode() if isinstance(first, dict) else None
    assert not isinstance(key, str)
    return Record(partition, offset, key, payload)


async def load_state(
    store: MemoryStore,
    partition: int = 0,
    partitions: int = 1,
    limits: Limits | None = None,
) -> PartitionState:
    """A partition's state as a worker builds it from the store."""
    snap = await store.load(partition)
    state = PartitionState(
        partition,
        partitions,
        limits or Limits(),
        KEY,
        snap.offset,
        snap.watermark,
        snap.open_visits,
    )
    state.load_visits(snap.visits)
    return state


async def process(
    store: MemoryStore, state: PartitionState, records: Sequence[Record], now_s: float
) -> Delta:
    """One worker batch: dedup look-up, apply, distinct counts, fenced commit."""
    decoded = decode(records)
    seen = await store.seen(state.partition, candidate_ids(decoded))
    loaded_offset = state.offset
    delta = state.apply(decoded, seen, now_s)
    await store.add_uniques(delta.uniques)
    assert await store.commit(delta, loaded_offset, DEDUP_RETENTION_MS)
    return delta


def now_after(ts_ms: int, seconds: float = 10.0) -> float:
    """A wall clock (epoch s) ``seconds`` after event time ``ts_ms``."""
    return ts_ms / 1000 + seconds


def scenario_batches() -> list[list[Record]]:
    """The hand-computed scenario of ``test_kpis`` and ``test_store`` (campaign ``c1``).

    ========  ==============================================  ==========================
    visitor   events (offset from 22:00)                      closed visit
    ========  ==============================================  ==========================
    a         page_view 0 s                                   bounce, 0 s
    b         page_view 60, interaction 120, 300,             540 s, 2 interactions
              participation 600 (Alice)
    c         page_view 30, page_view 90, share 100           70 s
    d         participation 200 (alice again, other casing)   0 s, not a bounce
    e         page_view 50 min                                still open
    ========  ==============================================  ==========================

    Then, with the watermark at 22:50: a late interaction of ``a`` (22:05), a duplicate of one
    of ``b``'s interactions and one invalid JSON record.
    """
    alice = {"first_name": "Alice", "last_name": "Martin", "email": "alice@example.com"}
    alice_again = {"first_name": " ALICE", "last_name": "martin ", "email": "Alice@Example.COM"}
    s = 1000
    batch1 = [
        record(0, event("a1", "page_view", H_MS, visitor_id="a")),
        record(
            1,
            [
                event("b1", "page_view", H_MS + 60 * s, visitor_id="b"),
                event("b2", "interaction", H_MS + 120 * s, visitor_id="b", action="click"),
            ],
        ),
        record(2, event("c1", "page_view", H_MS + 30 * s, visitor_id="c")),
        record(3, event("c2", "page_view", H_MS + 90 * s, visitor_id="c")),
    ]
    batch2 = [
        record(4, event("c3", "share", H_MS + 100 * s, visitor_id="c", network="facebook")),
        record(
            5, event("d1", "participation", H_MS + 200 * s, visitor_id="d", participant=alice_again)
        ),
        record(6, event("b3", "interaction", H_MS + 300 * s, visitor_id="b")),
        record(7, event("b4", "participation", H_MS + 600 * s, visitor_id="b", participant=alice)),
    ]
    batch3 = [
        record(8, event("e1", "page_view", H_MS + 50 * MIN_MS, visitor_id="e")),
        record(9, event("a2", "interaction", H_MS + 5 * MIN_MS, visitor_id="a")),  # late
        record(10, event("b2", "interaction", H_MS + 120 * s, visitor_id="b")),  # duplicate
        record(11, b'{"event_id": '),  # invalid JSON
    ]
    return [batch1, batch2, batch3]


async def run_scenario() -> MemoryStore:
    """Run :func:`scenario_batches` through one partition into a fresh store."""
    store = MemoryStore()
    now_s = now_after(H_MS + 50 * MIN_MS)
    for batch in scenario_batches():
        state = await load_state(store)
        await process(store, state, batch, now_s)
    return store
