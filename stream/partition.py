"""The state of one partition and what a batch of its records changes.

The worker processes a batch in two steps around one store look-up:

1. :func:`decode` turns records into events and rejections, and
   :meth:`PartitionState.visit_needs` lists the open visits the step needs from the store and the
   event ids whose "already counted?" answer it must give;
2. :meth:`PartitionState.apply` runs the batch through dedup, lateness, visits and windows, and
   returns a :class:`Delta`: everything the store must apply atomically with the new offset.

Records at or below the partition's applied offset are skipped, so a replay after a crash changes
nothing twice.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from stream.events import Event, EventJson, EventType, Reason, Rejection, decode_record
from stream.identity import participant_hash
from stream.partitioner import partitions_for
from stream.visits import ClosedVisit, Visit, VisitKey, VisitTracker, close_untracked
from stream.watermark import Watermark
from stream.windows import WINDOWS, bucket_start

# Names of the per-campaign counters (the store keeps them; metrics add the ``kpi_`` prefix).
EVENT_COUNTERS = {
    EventType.PAGE_VIEW: "page_views",
    EventType.INTERACTION: "interactions",
    EventType.PARTICIPATION: "participations",
    EventType.SHARE: "shares",
}
_PARTICIPATION = EventType.PARTICIPATION  # a member read from its class costs ~0.1 us (3.11)
VISITS = "visits"
BOUNCED = "bounced_visits"
DURATION_MS = "visit_duration_ms"
INTERACTIONS = "interactions"

# Bucket sizes, finest first; each divides the next (distinct counts are rolled up from the finest).
_BUCKETS_MS = sorted({spec.bucket_ms for spec in WINDOWS})
_FINEST_MS, _COARSER_MS = _BUCKETS_MS[0], tuple(_BUCKETS_MS[1:])
assert all(b % a == 0 for a, b in itertools.pairwise(_BUCKETS_MS)), "buckets must nest"

# Window-bucket field ``u:<kind>``: the bucket has distinct-count data of that kind (not a sum).
UNIQUE_MARK = "u:"

# Kinds of distinct counts kept per campaign and window bucket.
UNIQUE_VISITORS = "v"
UNIQUE_PARTICIPATING_VISITORS = "pv"
UNIQUE_PARTICIPANTS = "p"


@dataclass(frozen=True, slots=True)
class Record:
    """A Kafka record as the domain sees it."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejection with the record it came from (for the dead-letter topic's headers)."""

    record: Record
    rejection: Rejection


@dataclass(frozen=True, slots=True)
class Forward:
    """An event that belongs to another partition: re-published keyed by its visitor."""

    visitor_id: str
    value: bytes


@dataclass(slots=True)
class Delta:
    """What one batch (or one idle advance) changes, applied by the store atomically.

    Attributes:
        partition: The partition.
        offset: Last applied offset after this delta.
        watermark: The partition's watermark after this delta.
        counters: ``(campaign, counter) -> increment``.
        pipeline: ``counter -> increment`` (processed, duplicates, late, forwarded,
            ``rejected:<reason>``).
        windows: ``(bucket_ms, start_ms, campaign, field) -> increment`` for closed visits,
            attributed to the bucket of the visit's start.
        uniques: ``(campaign, kind, bucket_ms, start_ms) -> members`` (idempotent adds).
        seen: Event ids counted by this batch, in the order of their events.
        visits: Open visits changed: new list, or ``None`` when the key has none left.
        dead_letters: Rejections for the dead-letter topic.
        forwards: Events to re-publish on their visitor's partition.
        open_visits: Open visits of the partition after this delta.
    """

    partition: int
    offset: int
    watermark: Watermark
    counters: Counter[tuple[str, str]] = field(default_factory=Counter)
    pipeline: Counter[str] = field(default_factory=Counter)
    windows: Counter[tuple[int, int, str, str]] = field(default_factory=Counter)
    uniques: dict[tuple[str, str, int, int], set[str]] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    visits: dict[VisitKey, list[Visit] | None] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)
    open_visits: int = 0

    @property
    def empty(self) -> bool:
        """Whether the delta changes nothing but, at most, the offset and watermark."""
        return not (self.counters or self.pipeline or self.visits or self.dead_letters)


@dataclass(frozen=True, slots=True)
class Decoded:
    """A record with its decoded items."""

    record: Record
    items: list[Event | Rejection]


def decode(records: Iterable[Record]) -> list[Decoded]:
    """Decode each record's value into events and rejections."""
    return [Decoded(r, decode_record(r.value)) for r in records]


def candidate_ids(decoded: Sequence[Decoded]) -> list[str]:
    """Ids of the valid events of a batch: the store says which were already counted."""
    return [item.event_id for d in decoded for item in d.items if isinstance(item, Event)]


@dataclass(frozen=True, slots=True)
class VisitNeeds:
    """The open visits a step needs from the store: those of ``keys`` (each key once), and every
    visit whose last event time is before ``last_before_ms`` (it may close in this step), but
    those of ``held`` (the step has them: the store need not return them, and they are not
    loaded). ``ids``: the event ids whose "already counted?" answer the step needs (those
    :meth:`PartitionState.apply` may count: :func:`candidate_ids` less the records already
    applied and the events too far in the future). ``foreign``: the step's visitors whose
    events belong to another partition (:meth:`PartitionState.apply` looks up only these).
    ``touched``: every key the step's events may reach, held or not; ``None``: not known (any
    visit loaded may be reached)."""

    keys: list[VisitKey]
    last_before_ms: int
    held: Container[VisitKey] = ()
    ids: list[str] = field(default_factory=list)
    foreign: Container[str] = frozenset()
    touched: Container[VisitKey] | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """The time rules of the contract, in milliseconds."""

    gap_ms: int = 1_800_000
    lateness_ms: int = 600_000
    max_future_ms: int = 300_000
    idle_advance_s: float = 60.0


class PartitionState:
    """Everything the worker keeps for one partition, mirrored in the store.

    Args:
        partition: The partition number.
        partitions: How many partitions the topic has (to find a visitor's partition).
        limits: Gap, lateness, future bound and idle advance.
        identity_key: HMAC key for participant identities.
        offset: Last offset already applied (``-1``: none).
        watermark: The partition's watermark as stored.
        open_visits: Open visits of the partition, as stored.

    Open visits need not all be in memory: before a step, the worker loads the ones the step
    needs (:meth:`visit_needs`, :meth:`load_visits`) and may evict them after its commit
    (:meth:`evict_visits`, which may keep a bounded number), so that memory does not grow with
    the number of open visits.
    """

    def __init__(
        self,
        partition: int,
        partitions: int,
        limits: Limits,
        identity_key: bytes,
        offset: int = -1,
        watermark: Watermark | None = None,
        open_visits: int = 0,
    ) -> None:
        self.partition = partition
        self.partitions = partitions
        self.limits = limits
        self.identity_key = identity_key
        self.offset = offset
        self.watermark = watermark or Watermark()
        self.visits = VisitTracker(limits.gap_ms)
        self.open_visits = open_visits
        # (campaign, finest bucket of the start) -> the closed visits' sums, within a step:
        # visits, bounced, interactions, duration (see _close)
        self._closing: dict[tuple[str, int], list[int]] = {}
        # (campaign, type) -> events counted, within a step (see _count and _finish)
        self._tally: dict[tuple[str, EventType], int] = {}
        # Visits loaded for a step that no event of it reaches (see load_visits)
        self._untouched: list[tuple[VisitKey, list[Visit]]] = []
        self._lateness_ms = limits.lateness_ms

    def visit_needs(self, decoded: Sequence[Decoded], now_s: float) -> VisitNeeds:
        """The open visits :meth:`apply` may touch or close for this batch, the ids it may count
        and the visitors it must forward (one pass over the batch for all three).

        The partitions of the batch's visitors are computed once per visitor (not per event), all
        at once (see :func:`stream.partitioner.partitions_for`).
        """
        future_limit_ms = int(now_s * 1000) + self.limits.max_future_ms
        bound = self.watermark.watermark_ms
        keys: dict[VisitKey, None] = {}  # each key once, though met once per event
        ids: list[str] = []
        for d in decoded:
            if d.record.offset <= self.offset:
                continue
            for item in d.items:
                if not isinstance(item, Rejection) and item.ts_ms <= future_limit_ms:
                    ids.append(item.event_id)
                    keys[item.campaign_id, item.visitor_id] = None
                    if item.ts_ms > bound:
                        bound = item.ts_ms
        held = self.visits.keys()  # held visits are the store's, as of the last commit
        fetch = [key for key in keys if key not in held] if held else list(keys)
        foreign = self._foreign(list(dict.fromkeys(visitor for _, visitor in keys)))
        return VisitNeeds(fetch, bound - self.limits.gap_ms, held, ids, foreign, keys.keys())

    def _foreign(self, visitors: list[str]) -> set[str]:
        """Those of ``visitors`` (each once) whose events belong to another partition."""
        # Computed each step, not remembered: for a step's few thousand visitors, numpy's murmur2
        # costs less than look-ups in a memo of 100,000 visitors, cold in the CPU's caches.
        homes = partitions_for(visitors, self.partitions)
        partition = self.partition
        return {v for v, home in zip(visitors, homes, strict=True) if home != partition}

    def idle_needs(self, now_s: float) -> VisitNeeds | None:
        """The open visits :meth:`idle_advance` may close now; ``None``: it would do nothing."""
        target = self.watermark.idle_target(now_s, self.limits.idle_advance_s)
        if target is None:
            return None
        return VisitNeeds([], target - self.limits.gap_ms, self.visits.keys(), touched=())

    def load_visits(
        self, visits: Mapping[VisitKey, list[Visit]], needs: VisitNeeds | None = None
    ) -> None:
        """Bring open visits from the store into memory (keys already here are kept as they are).

        With the ``needs`` they were fetched for, the visits of keys no event of the step reaches
        (fetched because they may close: most of those a step closes) are not tracked. Nothing
        but the watermark can change them, and it only grows within a step, so whether each
        closes is decided once, at the step's last watermark (:meth:`_close_untouched`): the
        same outcome as tracking them, without their heap entries and dict slots.
        """
        tracker = self.visits
        untouched = self._untouched = []  # this step's only
        touched = needs.touched if needs is not None else None
        tracked = []
        for key, found in visits.items():
            if key in tracker:
                continue
            if touched is None or key in touched:
                tracked.append((key, found))
            else:
                untouched.append((key, found))
        tracker.load_many(tracked)

    def evict_visits(self, keep: int = 0, recent: Iterable[VisitKey] = ()) -> None:
        """Forget open visits held in memory, so that at most ``keep`` stay.

        Call after a commit: then every visit held is exactly the store's, and the next steps
        need not fetch them again (a visitor's events mostly come in several batches). Beyond
        ``keep``, only the visits of ``recent`` keys (those the last step changed) stay, up to
        half of ``keep``: memory stays bounded whatever the open visits, the active ones stay.
        """
        held = self.visits
        if len(held) <= keep:
            return
        self.visits = kept = VisitTracker(self.limits.gap_ms)
        room = keep // 2
        if not room:
            return
        staying = []
        for key in recent:
            visits = held.get(key)
            if visits and len(visits) <= room:
                staying.append((key, visits))
                room -= len(visits)
        kept.load_many(staying)

    def apply(
        self,
        decoded: Sequence[Decoded],
        seen: set[str],
        now_s: float,
        needs: VisitNeeds | None = None,
    ) -> Delta:
        """Apply a batch of this partition's records.

        Args:
            decoded: The batch, in offset order.
            seen: Which of the step's ids (:attr:`VisitNeeds.ids`, or any superset such as
                :func:`candidate_ids`) the store has already counted.
            now_s: Wall-clock time (epoch s), for the far-future bound and idle advance.
            needs: This batch's :meth:`visit_needs`, made on this state: its visitors to
                forward are used (otherwise they are found here).

        Returns:
            The changes, for the store. This state already reflects them: if the store refuses
            the delta, this state must be discarded and loaded again.
        """
        delta = Delta(self.partition, self.offset, self.watermark)
        held = len(self.visits)
        future_limit_ms = int(now_s * 1000) + self.limits.max_future_ms
        batch_seen: dict[str, None] = {}  # counted ids, in the order of their events
        processed = 0
        if needs is None:
            needs = self.visit_needs(decoded, now_s)
        foreign = needs.foreign
        for d in decoded:
            record = d.record
            if record.offset <= self.offset:
                continue  # already applied before a restart: replayed, skip
            own_key = record.key
            as_json = EventJson(record.value or b"")  # decodes only if an event leaves as JSON
            for index, item in enumerate(d.items):
                if isinstance(item, Rejection):
                    self._reject(delta, record, item)
                elif item.ts_ms > future_limit_ms:
                    rejection = Rejection(
                        Reason.BAD_TIMESTAMP, "ts is too far in the future", as_json[index], None
                    )
                    self._reject(delta, record, rejection)
                elif (
                    foreign
                    and item.visitor_id in foreign
                    # Keyed by its visitor: the producer's partitioner chose this partition.
                    and own_key != item.visitor_id.encode()
                ):
                    delta.forwards.append(Forward(item.visitor_id, as_json[index]))
                    delta.pipeline["forwarded"] += 1
                elif item.event_id in seen or item.event_id in batch_seen:
                    delta.pipeline["duplicates"] += 1
                else:
                    batch_seen[item.event_id] = None
                    processed += 1
                    self._count(delta, item)
            self.offset = record.offset
        if processed:
            delta.pipeline["processed"] += processed
        if decoded:
            self.watermark.arrived(now_s)
        delta.seen = list(batch_seen)
        return self._finish(delta, held)

    def idle_advance(self, now_s: float) -> Delta | None:
        """Move the watermark with the wall clock when idle; the delta of visits it closes."""
        held = len(self.visits)
        if not self.watermark.idle_advance(now_s, self.limits.idle_advance_s):
            self._untouched = []  # loaded for nothing: never closed by a later step
            return None
        delta = Delta(self.partition, self.offset, self.watermark)
        return self._finish(delta, held)

    def _reject(self, delta: Delta, record: Record, rejection: Rejection) -> None:
        delta.dead_letters.append(DeadLetter(record, rejection))
        delta.pipeline[f"rejected:{rejection.reason.value}"] += 1

    def _count(self, delta: Delta, event: Event) -> None:
        # The innermost step, once per counted event: attributes are read once into locals, and
        # plain dicts (a Counter's += costs twice a dict's: no specialised bytecode for it).
        campaign, visitor, ts_ms, event_type = (
            event.campaign_id,
            event.visitor_id,
            event.ts_ms,
            event.type,
        )
        tally = self._tally
        key = (campaign, event_type)
        try:
            tally[key] += 1
        except KeyError:
            tally[key] = 1
        if event_type is _PARTICIPATION:
            self._unique(delta, campaign, UNIQUE_PARTICIPATING_VISITORS, ts_ms, visitor)
            identity = participant_hash(self.identity_key, event)
            self._unique(delta, campaign, UNIQUE_PARTICIPANTS, ts_ms, identity)
        watermark = self.watermark
        watermark_ms = watermark.watermark_ms
        if watermark_ms >= 0 and ts_ms < watermark_ms - self._lateness_ms:
            delta.pipeline["late"] += 1
            self._unique(delta, campaign, UNIQUE_VISITORS, ts_ms, visitor)
            return
        visits = self.visits
        if visits.due(ts_ms if ts_ms > watermark_ms else watermark_ms):
            self._close(ts_ms if ts_ms > watermark_ms else watermark_ms)
        if ts_ms > watermark_ms:  # Watermark.observe, inline
            watermark.watermark_ms = ts_ms
        if ts_ms > watermark.newest_event_ms:  # not implied: an idle advance moves only the first
            watermark.newest_event_ms = ts_ms
        if visits.add(campaign, visitor, ts_ms, event_type, _FINEST_MS):
            # The visit it extends has an event in the same finest bucket: the visitor is in
            # that bucket's distinct count (and so in the coarser ones) already, added by this
            # step or, before an earlier step's commit, by it.
            return
        self._unique(delta, campaign, UNIQUE_VISITORS, ts_ms, visitor)

    @staticmethod
    def _unique(delta: Delta, campaign: str, kind: str, ts_ms: int, member: str) -> None:
        """Add to the finest bucket only; :meth:`_finish` fills the coarser ones from it."""
        key = (campaign, kind, _FINEST_MS, ts_ms - ts_ms % _FINEST_MS)
        members = delta.uniques.get(key)
        if members is None:
            delta.uniques[key] = {member}
        else:
            members.add(member)

    def _close(self, watermark_ms: int) -> None:
        self._add_closed(self.visits.close_until(watermark_ms))

    def _close_untouched(self, watermark_ms: int) -> dict[VisitKey, list[Visit] | None]:
        """Close the untouched visits (see :meth:`load_visits`) that ``watermark_ms`` closes;
        their keys' changes (the visits left, ``None``: none)."""
        untouched, self._untouched = self._untouched, []
        closed, changed = close_untracked(untouched, self.limits.gap_ms, watermark_ms)
        self._add_closed(closed)
        self.open_visits -= len(closed)
        return changed

    def _add_closed(self, closed: Iterable[ClosedVisit]) -> None:
        # Closed visits are summed per campaign and finest bucket of their start; _finish
        # spreads the sums over the counters and every window's bucket (a few adds per visit,
        # not one per window and field).
        closing = self._closing
        for campaign, visit in closed:
            first = visit.first_ms
            key = (campaign, bucket_start(first, _FINEST_MS))
            sums = closing.get(key)
            if sums is None:
                sums = closing[key] = [0, 0, 0, 0]
            sums[0] += 1
            sums[1] += visit.bounced
            sums[2] += visit.interactions
            sums[3] += visit.last_ms - first

    def _count_closed(self, delta: Delta) -> None:
        """Add the step's closed visits to the counters and to the window of their start."""
        counters, windows = delta.counters, delta.windows
        closing, self._closing = self._closing, {}
        for (campaign, start), sums in closing.items():
            visits, bounced, interactions, duration_ms = sums
            counters[campaign, VISITS] += visits
            counters[campaign, BOUNCED] += bounced
            counters[campaign, DURATION_MS] += duration_ms
            for spec in WINDOWS:  # the finest bucket's start is in the same coarser buckets
                bucket = spec.bucket_ms, bucket_start(start, spec.bucket_ms), campaign
                windows[(*bucket, VISITS)] += visits
                windows[(*bucket, BOUNCED)] += bounced
                windows[(*bucket, INTERACTIONS)] += interactions
                windows[(*bucket, DURATION_MS)] += duration_ms

    def _finish(self, delta: Delta, held: int) -> Delta:
        """Close what the step's last watermark closes, and fill the delta from the step."""
        watermark_ms = self.watermark.watermark_ms
        self._close(watermark_ms)
        untouched = self._close_untouched(watermark_ms)
        tally, self._tally = self._tally, {}
        for (campaign, event_type), n in tally.items():
            delta.counters[campaign, EVENT_COUNTERS[event_type]] += n
        self._count_closed(delta)
        uniques = delta.uniques
        for (campaign, kind, _, start), members in list(uniques.items()):
            for bucket_ms in _COARSER_MS:  # set unions in C, not one add per event and bucket
                key = (campaign, kind, bucket_ms, start - start % bucket_ms)
                coarse = uniques.get(key)
                if coarse is None:
                    uniques[key] = set(members)
                else:
                    coarse |= members
        for campaign, kind, bucket_ms, start in uniques:
            # Marks which distinct-count buckets hold data (readers count only those).
            delta.windows[bucket_ms, start, campaign, UNIQUE_MARK + kind] = 1
        delta.offset = self.offset
        delta.watermark = replace(self.watermark)
        delta.visits = self.visits.take_dirty()
        delta.visits.update(untouched)
        self.open_visits += len(self.visits) - held  # opened minus closed in this step
        delta.open_visits = self.open_visits
        return delta
