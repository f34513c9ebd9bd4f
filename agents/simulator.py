"""Realistic synthetic campaign traffic for ``kpi simulate`` and ``kpi demo``.

Visitors arrive on a few campaigns through several channels. A visit is a short run of events a
few seconds apart: a page view, often more page views and interactions (clicks, votes, answers),
sometimes a participation (with a participant identity, some people entering several campaigns or
twice), sometimes a share. About a third of visits bounce. Visitors come back for new visits after
more than the session gap. Most events travel in JSON-array envelopes (one per partition per tick),
some as single keyed records, a few without a key (re-keyed by the worker).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson

from stream.partitioner import partition_for

CAMPAIGNS = ("summer-contest", "quiz-cuisine", "vote-best-recipe", "form-newsletter")
CHANNELS = ("web", "web", "web", "facebook", "app", "email", "instagram")
FIRST_NAMES = ("Camille", "Lea", "Hugo", "Louis", "Chloe", "Jules", "Manon", "Lucas", "Emma")
LAST_NAMES = ("Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand")
ACTIONS = ("click", "click", "vote", "answer", "scroll", "comment")
NETWORKS = ("facebook", "x", "linkedin", "whatsapp")


@dataclass(slots=True)
class _Visit:
    visitor_id: str
    campaign_id: str
    channel: str
    steps_left: int
    bounce: bool
    next_ms: int
    participates: bool
    started: bool = False


@dataclass(frozen=True, slots=True)
class OutRecord:
    """A record to publish: explicit partition or key, and its value."""

    key: bytes | None
    partition: int | None
    value: bytes


@dataclass(slots=True)
class Simulator:
    """Generates events in (simulated or real) time.

    Args:
        partitions: Partitions of the events topic (to batch envelopes per partition).
        gap_s: The session gap: returning visitors come back after more than this.
        seed: Random seed (reproducible traffic).
    """

    partitions: int
    gap_s: float = 1800
    seed: int | None = None
    rng: random.Random = field(init=False)
    _visits: list[tuple[int, int, _Visit]] = field(init=False, default_factory=list)
    _dormant: dict[str, tuple[int, str]] = field(init=False, default_factory=dict)
    _ids: Iterator[int] = field(init=False, default_factory=itertools.count)
    _visitors: Iterator[int] = field(init=False, default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _person(self) -> dict[str, str]:
        rng = self.rng
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        n = rng.randrange(400)  # a bounded pool: some people participate more than once
        return {
            "first_name": f" {first} " if rng.random() < 0.1 else first,
            "last_name": last,
            "email": f"{first}.{last}{n}@example.com".lower(),
        }

    def _start_visit(self, now_ms: int) -> None:
        rng = self.rng
        oldest = next(iter(self._dormant), None)  # dormant visitors are kept oldest first
        back = oldest is not None and now_ms - self._dormant[oldest][0] > self.gap_s * 1000
        if back and rng.random() < 0.3:
            assert oldest is not None
            visitor_id = oldest
            campaign_id = self._dormant.pop(visitor_id)[1]
        else:
            visitor_id = f"v{next(self._visitors):07d}"
            campaign_id = rng.choices(CAMPAIGNS, weights=(5, 3, 2, 1))[0]
        bounce = rng.random() < 0.35
        self._push(
            _Visit(
                visitor_id,
                campaign_id,
                rng.choice(CHANNELS),
                steps_left=0 if bounce else rng.randint(1, 8),
                bounce=bounce,
                next_ms=now_ms,
                participates=not bounce and rng.random() < 0.45,
            )
        )

    def _event(self, visit: _Visit, kind: str, ts_ms: int) -> dict[str, object]:
        event: dict[str, object] = {
            "event_id": f"sim-{self.seed or 0}-{next(self._ids)}",
            "type": kind,
            "ts": ts_ms,
            "campaign_id": visit.campaign_id,
            "visitor_id": visit.visitor_id,
            "channel": visit.channel,
        }
        rng = self.rng
        if kind == "page_view":
            event["page"] = rng.choice(("/", "/rules", "/prizes", "/form"))
            event["page_type"] = rng.choice(("landing", "product", "content"))
        elif kind == "interaction":
            event["action"] = rng.choice(ACTIONS)
        elif kind == "participation":
            if rng.random() < 0.9:
                event["participant"] = self._person()
            event["optins"] = ["newsletter"] if rng.random() < 0.4 else []
        elif kind == "share":
            event["network"] = rng.choice(NETWORKS)
        return event

    def _push(self, visit: _Visit) -> None:
        heapq.heappush(self._visits, (visit.next_ms, next(self._ids), visit))

    def events(self, now_ms: int, count: int) -> list[dict[str, object]]:
        """About ``count`` events happening up to ``now_ms``, oldest first."""
        rng = self.rng
        out: list[dict[str, object]] = []
        visits = self._visits  # a heap of active visits by the time of their next event
        while len(out) < count:
            if not visits or visits[0][0] > now_ms or len(visits) < max(4, count // 2):
                self._start_visit(now_ms - rng.randrange(0, 1000))
                continue
            visit = heapq.heappop(visits)[2]
            if not visit.started:
                kind = "page_view"  # every visit lands on a page
                visit.started = True
            elif visit.steps_left == 1 and visit.participates:
                kind = "participation"
            else:
                kind = rng.choices(("page_view", "interaction", "share"), weights=(4, 6, 1))[0]
            out.append(self._event(visit, kind, min(visit.next_ms, now_ms)))
            visit.steps_left -= 1
            if visit.bounce or visit.steps_left < 0:
                self._dormant.pop(visit.visitor_id, None)
                self._dormant[visit.visitor_id] = (now_ms, visit.campaign_id)
                if len(self._dormant) > 5000:
                    self._dormant.pop(next(iter(self._dormant)))
            else:
                visit.next_ms = now_ms + rng.randrange(500, 8000)
                self._push(visit)
        out.sort(key=lambda e: e["ts"])  # type: ignore[arg-type, return-value]
        return out

    def records(self, events: list[dict[str, object]]) -> list[OutRecord]:
        """Package events as records: mostly envelopes per partition, some single, a few unkeyed."""
        rng = self.rng
        envelopes: dict[int, list[dict[str, object]]] = {}
        out: list[OutRecord] = []
        for event in events:
            visitor = str(event["visitor_id"])
            roll = rng.random()
            if roll < 0.1:
                out.append(OutRecord(visitor.encode(), None, orjson.dumps(event)))
            elif roll < 0.12:
                out.append(OutRecord(None, rng.randrange(self.partitions), orjson.dumps(event)))
            else:
                envelopes.setdefault(partition_for(visitor, self.partitions), []).append(event)
        for partition, batch in envelopes.items():
            out.append(OutRecord(None, partition, orjson.dumps(batch)))
        return out
