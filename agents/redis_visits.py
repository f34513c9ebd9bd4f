"""Open visits in Redis: small hashes with the due time in front of each value, and a shard index.

A partition's open visits are spread over :data:`OPEN_SHARDS` hashes ``kpi:{pP}:open:<shard>``
by a CRC-32 of their visit key (:func:`open_shard`), so that each stays small enough for Redis's
compact listpack encoding (about 45 bytes per visit instead of about 85 in one big hash table).
A value is :func:`stream.visits.encode_visits`'s text, whose second number is the earliest last
event time of the key's visits: its *due* time (a visit may close once the watermark passes due +
gap).

The sorted set ``kpi:{pP}:due`` scores each shard with a **lower bound** of its entries' due times,
so that a step fetches only shards that may hold a visit to close, and in them only those entries
(the script filters a shard's values by their due prefix). The invariant is that a shard's bound
is never above the due time of any of its entries; a bound below them only costs an extra scan:

- writing an entry lowers its shard's bound to the entry's due time if that is lower
  (``ZADD LT``), so a write never leaves a due time below its bound. A rewrite of an entry the
  fetch read with a due time not above the new one lowers nothing: the bound is not above the
  stored due time already, and the commit's fence guarantees nothing was written in between
  (on live traffic most writes are such rewrites, and each lowering costs Redis a sorted-set
  update);
- a scan reports, per shard, the smallest due time of the entries it did not return, and the
  partition's applied offset. The commit that follows sets the shard's bound to the smallest due
  time of: those entries, the returned ones it did not rewrite or delete, and the ones it writes
  (or removes the shard from the index when nothing is left). It does so only when the stored
  offset is still the scanned one (checked by the commit's script), i.e. nothing else was
  committed to the partition in between; otherwise the bound is only lowered, as for any write.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import orjson

from stream.visits import Visit, VisitKey, encode_key, encode_many

OPEN_SHARDS: Final = 4096
"""Open-visit hashes per partition (a power of two). Changing it changes the layout."""

# Fetch: KEYS[1] the meta hash, then shard hashes. ARGV[1] the due bound, ARGV[2] ``n, the key
# indices of the n shards to scan, then per scanned shard asked: key index, count`` and ARGV[3]
# the fields asked (JSON): those of scanned shards, shard by shard, then the lone ones. A lone
# field is in a shard not scanned, with its own key (a shard's key is repeated for each of its
# fields), after the scanned shards' keys: nearly every field of live traffic. Returns the
# applied offset; per scanned shard its key index, the smallest due time of the entries it keeps
# (-1: none) and the entries due before the bound (field, value, ...); then per field asked, in
# order, its value (nil: none, or returned above).
FETCH_LUA: Final = """
local bound = tonumber(ARGV[1])
local plan, asked = cjson.decode(ARGV[2]), cjson.decode(ARGV[3])
local offset = redis.call('HGET', KEYS[1], 'offset') or '-1'
local match, tonum = string.match, tonumber
local scans, taken = {}, {}
for i = 2, 1 + plan[1] do
  local k = plan[i]
  local all = redis.call('HGETALL', KEYS[k])
  local low, due_entries = -1, {}
  for j = 1, #all, 2 do
    local due = tonum(match(all[j + 1], '^%d+,(%d+)'))
    if due < bound then
      due_entries[#due_entries + 1] = all[j]
      due_entries[#due_entries + 1] = all[j + 1]
      taken[all[j]] = true
    elseif low < 0 or due < low then
      low = due
    end
  end
  scans[#scans + 1] = {k, low, due_entries}
end
local found, at = {}, 1  -- one value (or false) per field asked
for i = 2 + plan[1], #plan, 2 do
  local last = at + plan[i + 1] - 1
  if last == at then  -- one field
    found[at] = (not taken[asked[at]]) and redis.call('HGET', KEYS[plan[i]], asked[at]) or false
  else
    for first = at, last, 1000 do  -- a shard's fields in one call (unpack is chunked)
      local upto = math.min(first + 999, last)
      local values = redis.call('HMGET', KEYS[plan[i]], unpack(asked, first, upto))
      for j = first, upto do
        found[j] = (not taken[asked[j]]) and values[j - first + 1] or false
      end
    end
  end
  at = last + 1
end
local key_at = 1 + plan[1]
for j = at, #asked do  -- the lone fields
  key_at = key_at + 1
  found[j] = redis.call('HGET', KEYS[key_at], asked[j]) or false
end
return {offset, scans, found}
"""

# Write, a function of the commit's script (agents.redis_store): KEYS[base + 1] the due index, then
# shard hashes. ``plan``: the number g of shards written one by one, then per such shard ``key
# index (from base), shard, op, due, deletes, upserts``, then the number l of lone entries that
# lower their shard's bound, then the shard of each lone entry (below), those l first.
# ``strings``: those shards' fields to delete then fields and values to set, shard by shard, then
# the lone entries' fields, then their values. op 0: leave the shard's bound, 1: set it to due,
# 2: remove the shard from the index. A lone entry is one upsert in a shard that was not scanned,
# with its own key in KEYS (a shard's key is repeated for each of its entries): nearly every
# write of live traffic. One of the first l lowers its shard's bound to its due time, the second
# number of its value (see stream.visits.encode_visits), so that the worker sends no step and no
# due of its own for it. The others rewrite a key whose stored due time, as the fetch read it,
# is not above their own: the bound is at most that already. ``chunked(list, fn)`` (defined by
# the script) calls ``fn`` on the list in slices: Lua's stack holds a few thousand values.
WRITE_LUA: Final = """
local function write_visits(base, plan, strings)
  plan, strings = cjson.decode(plan), cjson.decode(strings)
  local at, due_index, last_step = 1, KEYS[base + 1], 1 + 6 * plan[1]
  local lower, set, remove = {}, {}, {}
  for i = 2, last_step, 6 do
    local key, shard, op, due = KEYS[base + plan[i]], plan[i + 1], plan[i + 2], plan[i + 3]
    local last = at + plan[i + 4] - 1
    if last >= at then  -- deletes are rare: no closure made for none
      chunked(strings, function(...) redis.call('HDEL', key, ...) end, at, last)
    end
    at = last + 1
    last = at + 2 * plan[i + 5] - 1
    if last == at + 1 then  -- one entry
      redis.call('HSET', key, strings[at], strings[last])
    elseif last > at then
      chunked(strings, function(...) redis.call('HSET', key, ...) end, at, last)
    end
    at = last + 1
    if op == 1 then
      set[#set + 1] = due
      set[#set + 1] = shard
    elseif op == 2 then
      remove[#remove + 1] = shard
    end
  end
  local match, key_at, lone = string.match, base + 1 + plan[1], #plan - last_step - 1
  local lowering = last_step + 1 + plan[last_step + 1]
  for i = last_step + 2, #plan do  -- the lone entries: their fields, then their values
    local value = strings[at + lone]
    key_at = key_at + 1
    redis.call('HSET', KEYS[key_at], strings[at], value)
    if i <= lowering then
      lower[#lower + 1] = match(value, '^%d+,(%d+)')
      lower[#lower + 1] = plan[i]
    end
    at = at + 1
  end
  -- The index's changes, many shards per call (a call per shard was most of this time).
  chunked(lower, function(...) redis.call('ZADD', due_index, 'LT', ...) end)
  chunked(set, function(...) redis.call('ZADD', due_index, ...) end)
  chunked(remove, function(...) redis.call('ZREM', due_index, ...) end)
end
"""

KEEP, SET, REMOVE = 0, 1, 2  # what the writes of a shard written one by one do to its bound


def open_shard(field_: str) -> int:
    """The shard of an encoded visit key (CRC-32 of its UTF-8: stable across processes)."""
    return zlib.crc32(field_.encode()) & (OPEN_SHARDS - 1)


@dataclass(slots=True)
class ScannedShard:
    """What a fetch saw of one due shard.

    Attributes:
        kept_low_ms: The smallest due time of its entries not returned, ``None``: none.
        returned: The entries returned as due: field -> due time.
    """

    kept_low_ms: int | None
    returned: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Scan:
    """A fetch's view of the due shards and of the keys it found, for the commit after it: it
    raises the shards' bounds, and lowers none for a key rewritten with a due time not below the
    one it was read with.

    Attributes:
        offset: The partition's applied offset when fetched.
        shards: Scanned shard -> what was seen.
        dues: Key asked and found -> the due time of its stored value.
    """

    offset: int
    shards: dict[int, ScannedShard] = field(default_factory=dict)
    dues: dict[VisitKey, int] = field(default_factory=dict)


@dataclass(slots=True)
class WritePlan:
    """The arguments of :data:`WRITE_LUA` but the keys' names.

    Attributes:
        shards: The shards written one by one (scanned, or with deletes), in the order of their
            keys (``KEYS[base + 2]`` onwards).
        steps: Per such shard ``key index, shard, op, due, deletes, upserts`` (flat).
        strings: Shard by shard, the fields to delete, then the fields and values to set.
        lone: The shard of each lone entry (an upsert in a shard not scanned), in the order of
            their keys (after the shards'): those that lower their shard's bound first.
        lone_fields: Each lone entry's field.
        lone_values: Each lone entry's value.
        lowering: How many of the lone entries, the first ones, lower their shard's bound.
    """

    shards: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    strings: list[str] = field(default_factory=list)
    lone: list[int] = field(default_factory=list)
    lone_fields: list[str] = field(default_factory=list)
    lone_values: list[str] = field(default_factory=list)
    lowering: int = 0

    def add(self, shard: int, op: int, due: int, gone: list[str], up: list[str]) -> None:
        """One shard's writes; ``due`` is its new bound (op :data:`SET`)."""
        self.shards.append(shard)
        self.steps += (len(self.shards) + 1, shard, op, due, len(gone), len(up) // 2)
        self.strings += gone
        self.strings += up

    def key_shards(self) -> list[int]:
        """The shard of each key the script is given after the due index, in order."""
        return self.shards + self.lone

    def arguments(self) -> tuple[bytes, bytes]:
        """The script's ``plan`` and ``strings`` (JSON)."""
        plan = orjson.dumps([len(self.shards), *self.steps, self.lowering, *self.lone])
        return plan, orjson.dumps(self.strings + self.lone_fields + self.lone_values)


def write_plan(
    changed: Mapping[VisitKey, list[Visit] | None],
    scan: Scan | None,
    encoded: Mapping[VisitKey, tuple[str, int]] | None = None,
) -> WritePlan:
    """The writes of a commit's open visits and the new bounds of their shards.

    Args:
        changed: The commit's open visits (``None``: the key has none left).
        scan: The fetch made for this commit, when still valid (its offset is the stored one);
            ``None``: no bound is set, and every write lowers its shard's bound.
        encoded: Keys already encoded (by the fetch), with their shards: the others are
            encoded here.
    """
    known = encoded or {}
    gone: dict[int, list[str]] = {}
    keys: list[VisitKey] = []  # the upserts'
    fields: list[str] = []
    shards: list[int] = []
    lists: list[list[Visit]] = []
    for visit_key, visits in changed.items():
        named = known.get(visit_key)
        if named is None:
            field_ = encode_key(visit_key)
            shard = open_shard(field_)
        else:
            field_, shard = named
        if visits is None:
            deletes = gone.get(shard)
            if deletes is None:
                gone[shard] = [field_]
            else:
                deletes.append(field_)
        else:
            keys.append(visit_key)
            fields.append(field_)
            shards.append(shard)
            lists.append(visits)
    values = encode_many(lists)  # all at once, in C
    plan = WritePlan()
    upserts = zip(keys, fields, shards, values, lists, strict=True)
    if scan is None:  # nothing known of the store: each upsert is a lone entry that lowers
        plan.lone, plan.lone_fields, plan.lone_values = shards, fields, values
        plan.lowering = len(shards)
    else:
        lone = _plan_scanned(plan, scan.shards, gone, upserts) if scan.shards else upserts
        _plan_lone(plan, lone, scan.dues)
    for shard, deletes in gone.items():
        plan.add(shard, KEEP, 0, deletes, [])  # deletes alone: a bound may stay low
    return plan


_Upsert = tuple[VisitKey, str, int, str, list[Visit]]
"""An upsert to plan: its key, field, shard, value and visits."""


def _due(visits: list[Visit]) -> int:
    """The due time of a key's visits: their earliest last event time."""
    return visits[0].last_ms if len(visits) == 1 else min(v.last_ms for v in visits)


def _plan_lone(plan: WritePlan, upserts: Iterable[_Upsert], dues: Mapping[VisitKey, int]) -> None:
    """Plan ``upserts`` as lone entries. One lowers its shard's bound unless its key was found by
    the fetch (``dues``) with a due time not above the one it is written with: the bound is not
    above the stored entry's due time, and a valid scan means nothing was committed since."""
    lowering: list[int] = []
    lowering_fields: list[str] = []
    lowering_values: list[str] = []
    rest: list[int] = []
    rest_fields: list[str] = []
    rest_values: list[str] = []
    for key, field_, shard, value, visits in upserts:
        stored = dues.get(key)
        if stored is not None and _due(visits) >= stored:
            rest.append(shard)
            rest_fields.append(field_)
            rest_values.append(value)
        else:
            lowering.append(shard)
            lowering_fields.append(field_)
            lowering_values.append(value)
    plan.lone, plan.lone_fields = lowering + rest, lowering_fields + rest_fields
    plan.lone_values, plan.lowering = lowering_values + rest_values, len(lowering)


def _plan_scanned(
    plan: WritePlan,
    scanned: Mapping[int, ScannedShard],
    gone: dict[int, list[str]],
    upserts: Iterable[_Upsert],
) -> list[_Upsert]:
    """Plan the upserts with the shards a fetch scanned: each scanned shard is written one by
    one, its bound set from all it holds after the commit (its deletes are taken from ``gone``).
    Returns the other upserts, to plan as lone entries."""
    lone: list[_Upsert] = []
    up: dict[int, list[str]] = {}  # upserts in scanned shards
    low: dict[int, int] = {}  # per scanned shard, the smallest due time written
    for upsert in upserts:
        _, field_, shard, value, visits = upsert
        if shard not in scanned:
            lone.append(upsert)
            continue
        due = _due(visits)
        pairs = up.get(shard)
        if pairs is None:
            up[shard] = [field_, value]
            low[shard] = due
        else:
            pairs += (field_, value)
            low[shard] = min(due, low[shard])
    for shard, seen in scanned.items():
        deletes, upserted = gone.pop(shard, []), up.pop(shard, [])
        rewritten = {*deletes, *upserted[::2]}  # a returned field changed can only be here
        lows = [due for f, due in seen.returned.items() if f not in rewritten]
        if seen.kept_low_ms is not None:
            lows.append(seen.kept_low_ms)
        if shard in low:
            lows.append(low[shard])
        op, due = (SET, min(lows)) if lows else (REMOVE, 0)
        plan.add(shard, op, due, deletes, upserted)
    return lone
