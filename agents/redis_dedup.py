"""Counted event ids in Redis: 16-byte digests in small sets, kept by generations of event time.

The contract keeps an ``event_id`` for at least 24 h of event time (``KPI_DEDUP_RETENTION_SECONDS``,
``R`` below) to tell a duplicate. A partition stores, per counted event, the BLAKE2b-128 digest
of its id (16 bytes, not the id: up to 128 characters), in the sets ``kpi:{pP}:seen:<gen>:<shard>``.
A digest goes to shard ``h mod shards`` of its generation, ``h`` its first 2 bytes: a
generation's shards are small sets, which Redis keeps as compact listpacks (about 20 bytes per
id) instead of hash tables (several times that), while a look-up scans one small shard per
generation.

**Generations.** A generation receives the ids of the commits made while it is *open*. It closes
when the watermark reaches its start + ``R``, or early when it is full (more than
:data:`FILL_MAX` ids per shard on average); a new one opens, lazily, with the next ids. A closed
generation is dropped whole (its shard keys deleted) by the first commit whose watermark is at
least its close + ``R``. An id written at watermark ``w`` sits in a generation closed at ``c >= w``
and is dropped at a watermark of at least ``c + R >= w + R``; every look-up checks every generation
not dropped. So an id is remembered for at least ``R`` of watermark time (at most about ``2 R``).

**Sizing.** Generations hold very different numbers of ids (a quiet day, a campaign launch), so
each one has its own number of shards, a power of two between :data:`SHARDS_MIN` and
:data:`SHARDS_MAX`: enough for the ids of the generation before it (or of the batch that opens
it) at :data:`FILL_TARGET` per shard, and four times the shards of one that closed full. A
generation of :data:`SHARDS_MAX` shards is not closed early (past :data:`SHARDS_MAX` *
:data:`FILL_MAX` ids its shards outgrow the listpack limit: still exact, less compact).

**Merging.** Every look-up checks every generation kept, at a Redis call per generation and shard
it touches: a partition whose traffic ramps up from a thousand ids to a million would keep five
generations, each closed full, and a look-up would cost five calls per id. So a generation of at
most :data:`MERGE_MAX` shards that fills up is *merged* instead: the commit that opens the bigger
one moves its ids there (re-sharded) and deletes it, in the same commit script. Its ids
then sit in a generation that closes later, so they are remembered at least as long. Larger
generations are left as they are: moving their ids would hold Redis for too long.

The generations live in the partition's meta hash (field ``seen``, :func:`format_generations`),
written with the offset by the commit's script. Look-ups send the table they assume and
the script checks it against the stored one, so a look-up never uses another layout than the one
stored.

**Digest collisions.** Two distinct ids collide when their 128-bit digests are equal. With ``n``
ids remembered by a partition and ``m`` look-ups against them, the chance of any false duplicate is
at most ``n * m / 2**128``: at 5,800 events/s on one partition, 10^9 ids remembered (two days) and
10^12 look-ups (five and a half years) give 3 * 10^-18. A false duplicate would drop an event, so
the digest is long enough to make that never happen in practice; 8 bytes would not (about 54 false
duplicates on the same figures).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import numpy as np

DIGEST_BYTES: Final = 16
SHARDS_MIN: Final = 16
SHARDS_MAX: Final = 65536  # 2**16: a shard is picked by a digest's first two bytes
FILL_TARGET: Final = 32  # ids per shard a new generation is sized for
FILL_MAX: Final = 64  # ids per shard, on average, that close a generation early
GROWTH: Final = 4  # a generation that closed full is followed by one this many times larger
MERGE_MAX: Final = 1024  # shards of the largest generation merged into the next when full

# Both scripts walk the digests shard by shard, in chunks (Lua's stack holds a few thousand
# values): ``groups`` is per shard ``key index, count``, ``positions`` the digests' positions,
# shard after shard (flat JSON), ``blob`` the digests end to end (one string: no per-digest object
# on the caller's side). Each digest is cut from the blob once, however many generations' shards
# it is looked up in. ``each`` calls ``fn(key, members, first)``, ``first`` the chunk's first index.
_EACH_CHUNK_LUA: Final = """
local function each(groups, positions, blob, fn)
  local sub, digests, at = string.sub, {}, 0
  for from = 0, #blob - 16, 16 do digests[from / 16] = sub(blob, from + 1, from + 16) end
  for g = 1, #groups, 2 do
    local key, last = KEYS[groups[g]], at + groups[g + 1]
    for first = at + 1, last, 1000 do
      local members = {}
      for j = first, math.min(first + 999, last) do
        members[#members + 1] = digests[positions[j]]
      end
      fn(key, members, first)
    end
    at = last
  end
end
"""

# Look-up: KEYS[1] the meta hash, then shard sets. ARGV[1] the generations the caller assumed
# (checked against the stored ones: nil when they differ), ARGV[2] the groups, ARGV[3] the
# positions, ARGV[4] the digests. Returns the 0-based positions found.
LOOKUP_LUA: Final = (
    _EACH_CHUNK_LUA
    + """
local stored = redis.call('HGET', KEYS[1], 'seen') or ''
if stored ~= ARGV[1] then return false end
local positions = cjson.decode(ARGV[3])
local found, out = {}, {}
each(cjson.decode(ARGV[2]), positions, ARGV[4], function(key, members, first)
  local flags = redis.call('SMISMEMBER', key, unpack(members))
  for j = 1, #flags do
    local position = positions[first + j - 1]
    if flags[j] == 1 and not found[position] then
      found[position] = true
      out[#out + 1] = position
    end
  end
end)
return out
"""
)

# Functions of the commit's script (agents.redis_store).
# Insert: ``groups``, ``positions`` and ``blob`` as above (JSON, JSON, the digests); the groups' key
# indices are the shard sets' indices in the script's KEYS.
# Merge: KEYS[base + 1 ..] the merged generation's ``old`` shards, then every shard of the one
# taking its ids, in order (``shards`` of them, a power of two).
COMMIT_LUA: Final = (
    _EACH_CHUNK_LUA
    + """
local function insert_ids(groups, positions, blob)
  each(cjson.decode(groups), cjson.decode(positions), blob, function(key, members)
    redis.call('SADD', key, unpack(members))
  end)
end

local function merge_generation(base, old, shards)
  local byte, into = string.byte, {}
  for k = base + 1, base + old do
    for _, member in ipairs(redis.call('SMEMBERS', KEYS[k])) do
      local shard = (byte(member, 1) * 256 + byte(member, 2)) % shards
      local members = into[shard]
      if members == nil then into[shard] = {member} else members[#members + 1] = member end
    end
    redis.call('DEL', KEYS[k])
  end
  for shard, members in pairs(into) do
    chunked(members, function(...) redis.call('SADD', KEYS[base + old + 1 + shard], ...) end)
  end
end
"""
)


def digest(event_id: str) -> bytes:
    """The 16 bytes stored for a counted ``event_id`` (BLAKE2b-128 of its UTF-8)."""
    return hashlib.blake2b(event_id.encode(), digest_size=DIGEST_BYTES).digest()


def shard_of(digest_: bytes, shards: int) -> int:
    """The shard of a digest in a generation of ``shards`` shards (a power of two, at most
    :data:`SHARDS_MAX`): its first two bytes, big-endian, modulo ``shards``."""
    return (digest_[0] << 8 | digest_[1]) & (shards - 1)


def shards_for(ids: int) -> int:
    """Shards for ``ids`` ids at :data:`FILL_TARGET` per shard: a power of two, within bounds."""
    shards = SHARDS_MIN
    while shards < SHARDS_MAX and shards * FILL_TARGET < ids:
        shards *= 2
    return shards


@dataclass(slots=True)
class Generation:
    """One generation of remembered ids.

    Attributes:
        gen: Its number (in its keys' names), increasing.
        shards: How many sets its ids are spread over (a power of two).
        start_ms: The watermark when it opened (epoch ms).
        closed_ms: The watermark when it closed, ``-1`` while open.
        count: Ids written to it.
    """

    gen: int
    shards: int
    start_ms: int
    closed_ms: int = -1
    count: int = 0

    @property
    def open(self) -> bool:
        """Whether it still receives ids."""
        return self.closed_ms < 0


def format_generations(generations: Sequence[Generation]) -> str:
    """The meta field's text: ``gen,shards,start_ms,closed_ms,count`` per generation, ``;``."""
    return ";".join(f"{g.gen},{g.shards},{g.start_ms},{g.closed_ms},{g.count}" for g in generations)


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
        merged: A generation that filled up: the commit moves its ids to ``target`` and deletes
            its keys (see :data:`COMMIT_LUA`).
    """

    generations: list[Generation]
    dropped: list[Generation] = field(default_factory=list)
    target: Generation | None = None
    merged: Generation | None = None


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
        The new table, the generations to drop, the one the ids go to, and the one merged into
        it.
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
    full = current is not None and current.count + adding > current.shards * FILL_MAX
    merged = None
    if adding and full and current is not None and current.shards < SHARDS_MAX:
        current.closed_ms = watermark_ms  # full: a bigger one follows
        if current.shards <= MERGE_MAX:  # and takes its ids
            merged = kept.pop()
        current = None
    if adding and current is None:
        last = merged or (kept[-1] if kept else (dropped[-1] if dropped else None))
        shards = shards_for(adding + (merged.count if merged else 0))
        if last is not None:
            closed_full = last.closed_ms < last.start_ms + retention_ms
            follows = (
                min(SHARDS_MAX, last.shards * GROWTH) if closed_full else shards_for(last.count)
            )
            shards = max(shards, follows)
        number = max((g.gen for g in (*kept, *dropped, merged) if g is not None), default=-1) + 1
        current = Generation(number, shards, watermark_ms, count=merged.count if merged else 0)
        kept.append(current)
    if adding and current is not None:
        current.count += adding
    return Roll(kept, dropped, current if adding else None, merged)


def shard_key(prefix: str, gen: int, shard: int) -> str:
    """The set of shard ``shard`` of generation ``gen``, under a partition's key ``prefix``."""
    return f"{prefix}{gen}:{shard}"


def generation_keys(prefix: str, generation: Generation) -> list[str]:
    """Every shard key of a generation (to delete it whole)."""
    return [shard_key(prefix, generation.gen, s) for s in range(generation.shards)]


@dataclass(slots=True)
class Plan:
    """Where a script finds each digest: shard keys, then per shard ``key index, count`` and the
    digests' positions shard after shard (see :data:`LOOKUP_LUA`, :data:`COMMIT_LUA`)."""

    keys: list[str] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    def add(self, prefix: str, generation: Generation, heads: np.ndarray, before: int) -> None:
        """Add a generation's shards; ``heads`` are the digests' first two bytes (big-endian,
        see :func:`heads`) and ``before`` the number of KEYS before this plan's."""
        shards = heads & (generation.shards - 1)
        # In numpy: a step looks up thousands of digests in each generation.
        order = np.argsort(shards, kind="stable")
        present, counts = np.unique(shards[order], return_counts=True)
        first = before + len(self.keys) + 1
        groups = np.empty(2 * len(present), dtype=np.int64)
        groups[0::2] = np.arange(first, first + len(present))
        groups[1::2] = counts
        self.keys += [shard_key(prefix, generation.gen, shard) for shard in present.tolist()]
        self.groups += groups.tolist()
        self.positions += order.tolist()


def heads(digests: bytes) -> np.ndarray:
    """The first two bytes of each digest in ``digests`` (end to end), as numbers: what
    :func:`shard_of` takes modulo the shards."""
    rows = np.frombuffer(digests, dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    return rows[:, 0].astype(np.int64) << 8 | rows[:, 1]


def lookup_plan(prefix: str, generations: Sequence[Generation], digests: bytes) -> Plan:
    """The plan of :data:`LOOKUP_LUA` for ``digests`` end to end (newest generation first;
    KEYS[1] is the meta hash)."""
    plan, first = Plan(), heads(digests)
    for generation in reversed(generations):
        plan.add(prefix, generation, first, before=1)
    return plan


def insert_plan(prefix: str, generation: Generation, digests: bytes, before: int = 0) -> Plan:
    """The plan of :data:`COMMIT_LUA`'s insert for ``digests`` end to end, its keys after
    ``before`` others in the script's KEYS."""
    plan = Plan()
    plan.add(prefix, generation, heads(digests), before=before)
    return plan
