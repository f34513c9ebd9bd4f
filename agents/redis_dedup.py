"""Counted event ids: 16-byte digests, kept by generations of event time, in Redis and in memory.

The contract keeps an ``event_id`` for at least 24 h of event time (``KPI_DEDUP_RETENTION_SECONDS``,
``R`` below) to tell a duplicate. A partition stores, per counted event, the BLAKE2b-128 digest
of its id (16 bytes, not the id: up to 128 characters), appended to its generation's strings
``kpi:{pP}:seen:<gen>:<segment>``: digests end to end, :data:`SEGMENT_IDS` per string at most
(16 MiB, far below Redis's 512 MB limit on a string). A commit appends its ids with one call per
string it reaches, however many: 16 bytes per id in Redis, and no Redis call per id.

**Look-ups stay in the worker.** The worker that owns a partition holds its digests in memory
(:class:`DigestIndex`: sorted numpy arrays, 16 bytes per id), read from Redis when it loads the
partition and extended by each of its commits once it is durable. The index is part of the
partition's state, like its offset: a worker that loses a fence or a round trip throws it away
with the rest and reads it again (:mod:`agents.processor`), and every commit is fenced on the
offset, commit count and generation table its look-ups were answered from. So a look-up answers
exactly for the state its commit applies to. (A local state with a durable log of its changes:
how Kafka Streams keeps its stores.) The price is the worker's memory: 16 bytes per id kept.

**Generations.** A generation receives the ids of the commits made while it is *open*. It closes
when the watermark reaches its start + ``R``; a new one opens, lazily, with the next ids. A closed
generation is dropped whole (its strings deleted) by the first commit whose watermark is at least
its close + ``R``. An id written at watermark ``w`` sits in a generation closed at ``c >= w`` and is
dropped at a watermark of at least ``c + R >= w + R``; every look-up checks every generation not
dropped. So an id is remembered for at least ``R`` of watermark time (at most about ``2 R``).

The generations live in the partition's meta hash (field ``seen``, :func:`format_generations`),
written with the offset by the commit's script.

**Digest collisions.** Two distinct ids collide when their 128-bit digests are equal. With ``n``
ids remembered by a partition and ``m`` look-ups against them, the chance of any false duplicate is
at most ``n * m / 2**128``: at 5,800 events/s on one partition, 10^9 ids remembered (two days) and
10^12 look-ups (five and a half years) give 3 * 10^-18. A false duplicate would drop an event, so
the digest is long enough to make that never happen in practice; 8 bytes would not (about 54 false
duplicates on the same figures). The index compares all 16 bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import numpy as np

DIGEST_BYTES: Final = 16
SEGMENT_IDS: Final = 1 << 20  # digests per string (16 MiB)
RUN_MAX: Final = 1 << 22  # ids of the largest sorted run the index merges (64 MiB)

# A function of the commit's script (agents.redis_store): appends ARGV[at + k - 1] to
# KEYS[base + k] for k = 1 .. count (digests end to end, see :func:`appends`).
COMMIT_LUA: Final = """
local function append_ids(base, count, at)
  for k = 1, count do redis.call('APPEND', KEYS[base + k], ARGV[at + k - 1]) end
end
"""


# A BLAKE2b-128 state with nothing hashed yet: copying it costs ~100 ns less than making one
# (the constructor parses its keyword arguments and sets the parameter block up each time).
_BLAKE2B_128: Final = hashlib.blake2b(digest_size=DIGEST_BYTES)


def digest(event_id: str) -> bytes:
    """The 16 bytes stored for a counted ``event_id`` (BLAKE2b-128 of its UTF-8)."""
    h = _BLAKE2B_128.copy()
    h.update(event_id.encode())
    return h.digest()


@dataclass(slots=True)
class Generation:
    """One generation of remembered ids.

    Attributes:
        gen: Its number (in its keys' names), increasing.
        start_ms: The watermark when it opened (epoch ms).
        closed_ms: The watermark when it closed, ``-1`` while open.
        count: Ids written to it.
    """

    gen: int
    start_ms: int
    closed_ms: int = -1
    count: int = 0

    @property
    def open(self) -> bool:
        """Whether it still receives ids."""
        return self.closed_ms < 0


def format_generations(generations: Sequence[Generation]) -> str:
    """The meta field's text: ``gen,start_ms,closed_ms,count`` per generation, ``;`` between."""
    return ";".join(f"{g.gen},{g.start_ms},{g.closed_ms},{g.count}" for g in generations)


def parse_generations(text: str | bytes | None) -> list[Generation]:
    """Inverse of :func:`format_generations` (``None`` or empty: no generation)."""
    if isinstance(text, bytes):
        text = text.decode()
    if not text:
        return []
    return [Generation(*map(int, part.split(","))) for part in text.split(";")]


@dataclass(slots=True)
class Roll:
    """What a commit does to the generations (see :func:`advance`).

    Attributes:
        generations: The generations after the commit, oldest first.
        dropped: Generations whose keys the commit deletes.
        target: The generation receiving the commit's ids (``None`` when it has none).
    """

    generations: list[Generation]
    dropped: list[Generation] = field(default_factory=list)
    target: Generation | None = None


def advance(
    generations: Sequence[Generation], watermark_ms: int, retention_ms: int, adding: int
) -> Roll:
    """The generations after a commit at ``watermark_ms`` that remembers ``adding`` new ids.

    Args:
        generations: The stored generations, oldest first (not modified).
        watermark_ms: The partition's watermark after the commit.
        retention_ms: How long an id must be remembered, in watermark time.
        adding: How many ids the commit writes.

    Returns:
        The new table, the generations to drop and the one the ids go to.
    """
    kept: list[Generation] = []
    dropped: list[Generation] = []
    for g in generations:
        g = replace(g)
        if not g.open and watermark_ms >= g.closed_ms + retention_ms:
            dropped.append(g)
        else:
            kept.append(g)
    current = kept[-1] if kept and kept[-1].open else None
    if current is not None and watermark_ms >= current.start_ms + retention_ms:
        current.closed_ms = watermark_ms  # its time is up
        current = None
    if not adding:
        return Roll(kept, dropped)
    if current is None:
        number = max((g.gen for g in (*kept, *dropped)), default=-1) + 1
        current = Generation(number, watermark_ms)
        kept.append(current)
    current.count += adding
    return Roll(kept, dropped, current)


def segment_key(prefix: str, gen: int, segment: int) -> str:
    """The string of segment ``segment`` of generation ``gen``, under a partition's ``prefix``."""
    return f"{prefix}{gen}:{segment}"


def generation_keys(prefix: str, generation: Generation) -> list[str]:
    """Every string of a generation, in order (to read or delete it whole)."""
    segments = -(-generation.count // SEGMENT_IDS)
    return [segment_key(prefix, generation.gen, s) for s in range(segments)]


def appends(prefix: str, target: Generation, digests: bytes) -> list[tuple[str, bytes]]:
    """What a commit appends to the strings of ``target`` (its ``count`` already includes the
    ``digests``, end to end): per string reached, its key and its part of them."""
    total = len(digests) // DIGEST_BYTES
    out: list[tuple[str, bytes]] = []
    at = 0
    while at < total:
        position = target.count - total + at
        take = min(SEGMENT_IDS - position % SEGMENT_IDS, total - at)
        key = segment_key(prefix, target.gen, position // SEGMENT_IDS)
        out.append((key, digests[at * DIGEST_BYTES : (at + take) * DIGEST_BYTES]))
        at += take
    return out


def _halves(digests: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Digests end to end as two columns of 8-byte numbers: first halves, second halves."""
    both = np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)
    return both[:, 0].copy(), both[:, 1].copy()


@dataclass(slots=True)
class _Run:
    """Digests sorted by their first halves (``first``), second halves alongside."""

    first: np.ndarray
    second: np.ndarray

    @classmethod
    def of(cls, first: np.ndarray, second: np.ndarray) -> _Run:
        # Stable sort of uint64 is a merge sort: near linear on runs already sorted.
        order = np.argsort(first, kind="stable")
        return cls(first[order], second[order])

    def __len__(self) -> int:
        return len(self.first)

    def find(self, first: np.ndarray, second: np.ndarray, found: np.ndarray) -> None:
        """Set ``found`` where a digest (``first``, ``second``) is in this run."""
        at = np.minimum(np.searchsorted(self.first, first), len(self.first) - 1)
        head = self.first[at] == first
        found |= head & (self.second[at] == second)
        # Equal first halves of distinct digests (about n / 2**64 per look-up): the ones
        # after ``at`` with the same first half are checked one by one.
        for i in np.flatnonzero(head & ~found).tolist():
            j = int(at[i]) + 1
            while j < len(self.first) and self.first[j] == first[i]:
                if self.second[j] == second[i]:
                    found[i] = True
                    break
                j += 1


class DigestIndex:
    """The digests of a partition's generations, in memory, for its look-ups.

    Per generation, sorted runs of sizes roughly doubling from the newest to the oldest (a new
    run is merged with the one before it while that one is at most twice its size, up to
    :data:`RUN_MAX` ids): a look-up costs one binary search per run, a few dozen for millions of
    ids, and adding ids costs about ``log2(n)`` sorted-merge passes each.

    Args:
        generations: The partition's generation table as stored.
        digests: Per generation number, its digests end to end, as stored.
    """

    def __init__(self, generations: Sequence[Generation], digests: dict[int, bytes]) -> None:
        self.generations = list(generations)
        self._runs: dict[int, list[_Run]] = {}
        for g in self.generations:
            blob = digests.get(g.gen, b"")
            if len(blob) != g.count * DIGEST_BYTES:
                raise ValueError(
                    f"generation {g.gen} holds {len(blob) // DIGEST_BYTES} digests, "
                    f"its table says {g.count}"
                )
            self._runs[g.gen] = [_Run.of(*_halves(blob))] if blob else []

    @property
    def text(self) -> str:
        """The generation table, as the meta hash holds it."""
        return format_generations(self.generations)

    def __len__(self) -> int:
        return sum(len(run) for runs in self._runs.values() for run in runs)

    def contains(self, digests: bytes) -> np.ndarray:
        """Whether each of ``digests`` (end to end) is held: booleans, in their order."""
        first, second = _halves(digests)
        # Searched in order, a binary search starts where the previous one ended: in a run of
        # millions, 2.7 times faster than in the probe's order (5,000 probes, 4,000,000 ids).
        order = np.argsort(first)
        first, second = first[order], second[order]
        found = np.zeros(len(first), dtype=bool)
        for runs in self._runs.values():
            for run in runs:
                run.find(first, second, found)
        unsorted = np.empty_like(found)
        unsorted[order] = found
        return unsorted

    def committed(self, roll: Roll, digests: bytes) -> None:
        """Follow a durable commit: its dropped generations go, its ``digests`` join its
        target."""
        for g in roll.dropped:
            self._runs.pop(g.gen, None)
        self.generations = list(roll.generations)
        if roll.target is None or not digests:
            return
        runs = self._runs.setdefault(roll.target.gen, [])
        runs.append(_Run.of(*_halves(digests)))
        while len(runs) > 1 and len(runs[-2]) <= 2 * len(runs[-1]):
            if len(runs[-2]) + len(runs[-1]) > RUN_MAX:
                break
            newest, older = runs.pop(), runs.pop()
            first = np.concatenate((older.first, newest.first))
            runs.append(_Run.of(first, np.concatenate((older.second, newest.second))))

    def runs(self) -> list[int]:
        """The sizes of the runs, generation after generation (for tests)."""
        return [len(run) for runs in self._runs.values() for run in runs]
