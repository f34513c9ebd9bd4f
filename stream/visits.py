"""Event-time visits: the events of one ``(campaign, visitor)`` at most ``gap`` apart.

Out-of-order events inside the gap join their visit; an event within the gap of two visits merges
them. A visit closes when the watermark passes its last event time plus the gap. Closing is done
event by event (the caller closes before adding each event), so the visits found do not depend on
how the input was cut into batches.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, KeysView, Sequence
from typing import Final

import msgspec

from stream.events import EventType

VisitKey = tuple[str, str]
"""``(campaign_id, visitor_id)``."""


class Visit(msgspec.Struct, gc=False, array_like=True):
    """An open or closed visit: its time span and what happened in it.

    Never tracked by the garbage collector (``gc=False``: its fields are ints, it cannot be part
    of a cycle): a step loads thousands, and the collector would walk each one still alive at
    each young collection. In JSON (msgspec) an array of its fields, in order (``array_like``):
    the store's text (:func:`encode_visits`) is made and read by msgspec in C.
    """

    first_ms: int
    last_ms: int
    page_views: int = 0
    interactions: int = 0
    events: int = 0

    @property
    def bounced(self) -> bool:
        """Exactly one page view and no other event."""
        return self.events == 1 and self.page_views == 1

    @property
    def duration_ms(self) -> int:
        """Last minus first event time (0 for a bounce)."""
        return self.last_ms - self.first_ms

    def absorb(self, other: Visit) -> None:
        """Merge ``other`` into this visit."""
        self.first_ms = min(self.first_ms, other.first_ms)
        self.last_ms = max(self.last_ms, other.last_ms)
        self.page_views += other.page_views
        self.interactions += other.interactions
        self.events += other.events

    def pack(self) -> list[int]:
        """Compact form for the store."""
        return [self.first_ms, self.last_ms, self.page_views, self.interactions, self.events]

    @classmethod
    def unpack(cls, data: list[int]) -> Visit:
        """Inverse of :meth:`pack`."""
        return cls(*data)


def encode_key(key: VisitKey) -> str:
    """A visit key as one store field: ``<len(campaign)>:<campaign><visitor>`` (unambiguous)."""
    campaign, visitor = key
    return f"{len(campaign)}:{campaign}{visitor}"


def decode_key(field: str) -> VisitKey:
    """Inverse of :func:`encode_key`."""
    size, _, rest = field.partition(":")
    n = int(size)
    return rest[:n], rest[n:]


def encode_visits(visits: list[Visit]) -> str:
    """Open visits as compact text: the JSON of their list, ordered by last event time, without
    its outer brackets: ``first,last,page_views,interactions,events],[first,...`` (times in epoch
    ms). Its second number is thus the earliest last event time: the time after which (plus the
    gap) one of these visits may close. The store reads that number without decoding the rest.
    """
    return encode_many([visits])[0]


def _last_ms(visit: Visit) -> int:
    return visit.last_ms


# msgspec's JSON, shared (a Visit is a JSON array: see Visit).
_ENCODE: Final = msgspec.json.Encoder().encode
_DECODE_MANY: Final = msgspec.json.Decoder(list[list[Visit]]).decode


def encode_many(lists: Sequence[list[Visit]]) -> list[str]:
    """:func:`encode_visits` of each of ``lists`` (none empty), encoded together in one C call:
    the JSON of all is cut where one list ends and the next starts (``]],[[`` occurs nowhere
    else)."""
    if not lists:
        return []
    ordered = [v if len(v) == 1 else sorted(v, key=_last_ms) for v in lists]
    return _ENCODE(ordered)[3:-3].decode().split("]],[[")


def decode_visits(text: str) -> list[Visit]:
    """Inverse of :func:`encode_visits` (the visits in the text's order): the format's reference;
    the store reads its values with :func:`decode_many`."""
    visits = []
    for part in text.split("],["):
        first, last, page_views, interactions, events = map(int, part.split(","))
        visits.append(Visit(first, last, page_views, interactions, events))
    return visits


def decode_many(texts: Sequence[bytes]) -> list[list[Visit]]:
    """:func:`decode_visits` of each of ``texts`` (UTF-8), parsed together in one C call: with
    their brackets back, they are one JSON array of lists of visits."""
    if not texts:
        return []
    return _DECODE_MANY(b"[[[" + b"]],[[".join(texts) + b"]]]")


# Page views and interactions one event of each type adds to its visit (ints: stored as counts).
_COUNTS: dict[EventType, tuple[int, int]] = {
    t: (int(t is EventType.PAGE_VIEW), int(t is EventType.INTERACTION)) for t in EventType
}


def _first_ms(visit: Visit) -> int:
    return visit.first_ms


ClosedVisit = tuple[str, Visit]
"""A visit that closed, with its campaign: ``(campaign_id, visit)``. A plain tuple: a step closes
thousands, and a frozen dataclass cost 0.38 us each to build (its ``__init__`` sets each field
through ``object.__setattr__``), a tuple 0.02."""


def _split_closed(
    visits: list[Visit], gap_ms: int, watermark_ms: int
) -> tuple[list[Visit], list[Visit]]:
    """``visits`` that ``watermark_ms`` closes (strictly after last event time plus the gap),
    and the others."""
    if len(visits) == 1:  # nearly always
        return (visits, []) if visits[0].last_ms + gap_ms < watermark_ms else ([], visits)
    ended = [v for v in visits if v.last_ms + gap_ms < watermark_ms]
    return ended, [v for v in visits if v.last_ms + gap_ms >= watermark_ms]


def close_untracked(
    loaded: Iterable[tuple[VisitKey, list[Visit]]], gap_ms: int, watermark_ms: int
) -> tuple[list[ClosedVisit], dict[VisitKey, list[Visit] | None]]:
    """Close, by the rule of :meth:`VisitTracker.close_until`, open visits no tracker holds: those
    ``watermark_ms`` closes, and per key that lost some, the visits left (``None``: none)."""
    closed: list[ClosedVisit] = []
    changed: dict[VisitKey, list[Visit] | None] = {}
    for key, visits in loaded:
        ended, kept = _split_closed(visits, gap_ms, watermark_ms)
        if ended:
            closed += [(key[0], visit) for visit in ended]
            changed[key] = kept or None
    return closed, changed


class VisitTracker:
    """The open visits of one partition.

    Args:
        gap_ms: The idle gap that separates two visits, in milliseconds.
    """

    def __init__(self, gap_ms: int) -> None:
        self.gap_ms = gap_ms
        self._open: dict[VisitKey, list[Visit]] = {}
        # A heap of (deadline, campaign, visitor): each open visit has an entry whose deadline is
        # at most its last event time plus the gap. A lower bound, not the deadline itself: an
        # event that extends a visit pushes nothing (it was one push per event); close_until
        # pushes the later deadline when it meets the stale one.
        self._deadlines: list[tuple[int, str, str]] = []
        self._count = 0
        self.dirty: set[VisitKey] = set()

    def __len__(self) -> int:
        """Number of open visits."""
        return self._count

    def get(self, key: VisitKey) -> list[Visit] | None:
        """The open visits of ``key`` (oldest first), ``None`` when it has none."""
        return self._open.get(key)

    def __contains__(self, key: VisitKey) -> bool:
        """Whether ``key`` has open visits here."""
        return key in self._open

    def keys(self) -> KeysView[VisitKey]:
        """The keys with open visits here (a live view: ``in`` costs no call)."""
        return self._open.keys()

    def load(self, key: VisitKey, visits: list[Visit]) -> None:
        """Restore the open visits of ``key`` from the store (``key`` must not be here yet)."""
        self.load_many([(key, visits)])

    def load_many(self, items: Iterable[tuple[VisitKey, list[Visit]]]) -> None:
        """:meth:`load` each ``(key, visits)``; the deadline heap is rebuilt once when that is
        cheaper than a push per visit."""
        opened = self._open
        gap = self.gap_ms
        entries = []
        for key, visits in items:
            if len(visits) > 1:
                visits = sorted(visits, key=_first_ms)
                entries += [(v.last_ms + gap, *key) for v in visits]
            else:
                entries.append((visits[0].last_ms + gap, *key))
            opened[key] = visits
            self._count += len(visits)
        heap = self._deadlines
        if len(entries) * 8 > len(heap):
            heap += entries
            heapq.heapify(heap)
        else:
            for entry in entries:
                heapq.heappush(heap, entry)

    def add(
        self, campaign_id: str, visitor_id: str, ts_ms: int, event_type: EventType, bucket_ms: int
    ) -> bool:
        """Add one event (already known not to be late) to its visit.

        Returns:
            Whether the visit it extends already had an event (its first or its last) in the
            event's ``bucket_ms``-aligned bucket: then the visitor was seen in that bucket
            before. ``False`` when not known (a new visit, or a key with several).
        """
        key = (campaign_id, visitor_id)
        page_views, interactions = _COUNTS[event_type]
        visits = self._open.get(key)
        gap = self.gap_ms
        if visits is not None and len(visits) == 1:
            one = visits[0]
            if one.first_ms - gap <= ts_ms <= one.last_ms + gap:
                # The common case: the event extends the visitor's one open visit, in place.
                start = ts_ms - ts_ms % bucket_ms
                seen = start <= one.last_ms < start + bucket_ms or (
                    start <= one.first_ms < start + bucket_ms
                )
                one.page_views += page_views
                one.interactions += interactions
                one.events += 1
                self.dirty.add(key)
                if ts_ms < one.first_ms:
                    one.first_ms = ts_ms
                elif ts_ms > one.last_ms:
                    one.last_ms = ts_ms  # a later deadline: its heap entry stays a lower bound
                return seen
        new = Visit(ts_ms, ts_ms, page_views, interactions, 1)
        if visits is None:
            self._open[key] = [new]
            self._count += 1
        else:
            kept = []
            for visit in visits:
                if visit.first_ms - gap <= ts_ms <= visit.last_ms + gap:
                    new.absorb(visit)
                else:
                    kept.append(visit)
            self._count += len(kept) + 1 - len(visits)
            kept.append(new)
            if len(kept) > 1:
                kept.sort(key=_first_ms)
            self._open[key] = kept
        self.dirty.add(key)
        heapq.heappush(self._deadlines, (new.last_ms + self.gap_ms, campaign_id, visitor_id))
        return False

    def due(self, watermark_ms: int) -> bool:
        """Whether :meth:`close_until` ``watermark_ms`` may close something (a cheap test)."""
        heap = self._deadlines
        return bool(heap) and heap[0][0] < watermark_ms

    def close_until(self, watermark_ms: int) -> list[ClosedVisit]:
        """Close every visit whose last event time plus the gap is before ``watermark_ms``."""
        closed: list[ClosedVisit] = []
        heap = self._deadlines
        gap = self.gap_ms
        while heap and heap[0][0] < watermark_ms:
            _, campaign_id, visitor_id = heapq.heappop(heap)
            key = (campaign_id, visitor_id)
            visits = self._open.get(key)
            if not visits:
                continue  # a stale entry: the key's visits were merged or closed already
            ended, kept = _split_closed(visits, gap, watermark_ms)
            if ended:
                closed += [(campaign_id, visit) for visit in ended]
                self._count -= len(ended)
                self.dirty.add(key)
                if kept:
                    self._open[key] = kept
                else:
                    del self._open[key]
            if kept:  # extended since the entry was pushed: the entry of its deadline now
                deadline = min(v.last_ms for v in kept) + gap
                heapq.heappush(heap, (deadline, campaign_id, visitor_id))
        if len(heap) > 2 * self._count + 1024:
            self._compact()
        return closed

    def _compact(self) -> None:
        """Drop stale deadlines (merged or extended visits leave their old deadline behind)."""
        self._deadlines = [
            (v.last_ms + self.gap_ms, *key) for key, visits in self._open.items() for v in visits
        ]
        heapq.heapify(self._deadlines)

    def take_dirty(self) -> dict[VisitKey, list[Visit] | None]:
        """The keys changed since the last call, with their open visits (``None``: none left)."""
        changed = {key: self._open.get(key) for key in self.dirty}
        self.dirty = set()
        return changed
