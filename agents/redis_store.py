"""The Redis implementation of :class:`stream.store.Store`.

Key design (``P`` a partition, ``C`` a campaign; ``{...}`` is the Redis Cluster hash tag):

=====================================  ===============================================  =======
key                                    holds                                            type
=====================================  ===============================================  =======
``kpi:{pP}:meta``                      applied offset, watermark, newest event time,    hash
                                       commit count (``rev``), layout, dedup generations,
                                       the hashes of sums the last commit changed
``kpi:{pP}:cnt``                       ``C\\x1f<counter>`` -> total                      hash
``kpi:{pP}:pipe``                      pipeline counters                                hash
``kpi:{pP}:open:<shard>``              visit key -> due time and open visits (text)     hash
``kpi:{pP}:due``                       open shards by a lower bound of their due times  zset
``kpi:{pP}:w:<bucket_ms>:<start_ms>``  ``C\\x1f<field>`` -> closed-visit sums            hash
``kpi:{pP}:wb``                        window bucket keys by start (for purging)        zset
``kpi:{pP}:seen:<gen>:<segment>``      16-byte digests of counted event ids, appended   string
``kpi:{cC}:u:<kind>:<bucket_ms>:<s>``  distinct visitors / participants of a bucket     HLL
``kpi:{cC}:uver``                      version of the campaign's HLLs (changes on add)  string
``kpi:store``                          identity marker: random id and creation time     string
=====================================  ===============================================  =======

Open visits are sharded into many small hashes so that Redis keeps each in its compact listpack
encoding: see :mod:`agents.redis_visits` (the shards, their due index and why a stale bound never
misses a close). Counted ids are digests appended to strings, looked up in the worker's memory:
see :mod:`agents.redis_dedup` (the digests, their generations of event time and the retention
they guarantee). The meta hash's ``layout`` field
names this layout: a partition written by another one is refused (:class:`StoreLayoutError`).

Every key a commit writes carries its partition's hash tag, so one script (:data:`_COMMIT_LUA`,
fenced inside on the applied offset and commit count) applies a
batch atomically with its offset, on a single Redis or a Redis Cluster. HyperLogLogs are keyed by
campaign instead (one ``PFCOUNT`` unions a window's buckets across partitions); ``PFADD`` is
idempotent, so they are written before the commit, outside it. The script that adds to them also
increments the campaign's ``uver`` when an add changed something, and every commit increments its
partition's ``rev``: a scrape re-reads only the partitions and re-counts only the campaigns that
changed (:mod:`agents.redis_read`).

The identity marker is written once (``SET NX``) by the first worker and never changed: a Redis that
restarted empty, or was flushed, has no marker or a new one, which is how workers tell "nothing
applied yet" from "everything applied was lost" (see :mod:`agents.processor`).
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson
from redis.asyncio import Redis

from agents import redis_dedup, redis_visits
from agents.redis_dedup import DigestIndex, digest, parse_generations
from agents.redis_read import SEP, SnapshotReader
from agents.redis_visits import Scan, ScannedShard, open_shard
from stream.kpis import KpiSnapshot
from stream.partition import UNIQUE_MARK, Delta, VisitNeeds
from stream.store import PartitionSnapshot, UniqueAdds
from stream.visits import Visit, VisitKey, decode_key, decode_many, encode_key
from stream.watermark import Watermark
from stream.windows import RETENTION_MS

# The layout of a partition's keys (the meta hash's ``layout`` field). The unsharded one of the
# 0.1.0 development versions had no such field, layout 2 kept counted ids in small sets, layout 3
# open visits as ``last,duration,...`` text; their stores are not read (replay them instead).
LAYOUT = "4"

# Batches carry thousands of ids and members: redis-py encodes each command argument in Python,
# so these scripts take them as ONE JSON argument and loop in Redis (cjson decodes in C).
# ``unpack`` is chunked: Lua's stack holds a few thousand values at most.
# KEYS: a campaign's HyperLogLogs, then its distinct-count version (see agents.redis_read),
# incremented only when an add changed a HyperLogLog: a replay's re-adds change nothing, so they
# leave every cached count valid. The version lives as long as the longest-lived of them.
_PFADD_LUA = """
local sets = cjson.decode(ARGV[1])
local changed = 0
for k = 1, #KEYS - 1 do
  local members = sets[k]
  for i = 1, #members, 2000 do
    local last = math.min(i + 1999, #members)
    changed = changed + redis.call('PFADD', KEYS[k], unpack(members, i, last))
  end
  redis.call('EXPIRE', KEYS[k], ARGV[2])
end
local version = KEYS[#KEYS]
if changed > 0 then redis.call('INCR', version) end
redis.call('EXPIRE', version, ARGV[2])
return changed
"""


# The commit, one script: atomic as a MULTI/EXEC (and written to the AOF as one), with its fence
# inside, where WATCH, two reads and MULTI/EXEC cost the worker four round trips per step.
# KEYS[1] the meta hash, KEYS[2] the window-bucket index, then each part's keys in order.
# ARGV[1] (JSON): the fence (the applied offset, the commit count ``rev`` (-1: not checked) and the
# dedup generations the commit was computed on), meta's new fields, the oldest window bucket kept
# (text), the parts, ``[name, keys, args]`` each, and the names of the hashes of sums the commit
# changes (``cnt pipe w:<bucket_ms>:<start_ms> ...``, for readers); then the parts' arguments in
# order.
# Returns false when fenced out, else the new ``rev`` and the window buckets past retention: the
# next commit deletes them (a script may touch only the keys it is given).
_COMMIT_LUA = (
    """
local function chunked(list, call, first, last)
  first, last = first or 1, last or #list
  for j = first, last, 1000 do call(unpack(list, j, math.min(j + 999, last))) end
end

-- Sums and marks, per hash KEYS[base + k]: ``[increments, marks, start]``, where increments are
-- ``field, n, ...`` (n as text: exact), marks the fields set to 1 (stream.partition.UNIQUE_MARK)
-- and start the window bucket's start for the index (-1: none).
local function apply(base, ops)
  ops = cjson.decode(ops)
  for k = 1, #ops do
    local key, op = KEYS[base + k], ops[k]
    local increments, marks = op[1], op[2]
    for i = 1, #increments, 2 do
      redis.call('HINCRBY', key, increments[i], increments[i + 1])
    end
    for i = 1, #marks do
      redis.call('HSET', key, marks[i], 1)
    end
    if op[3] >= 0 then redis.call('ZADD', KEYS[2], op[3], key) end
  end
end

-- Deletes KEYS[base + 1 .. base + count]; window buckets also leave the index.
local function delete(base, count, buckets)
  local first, last = base + 1, base + count
  chunked(KEYS, function(...) redis.call('UNLINK', ...) end, first, last)
  if buckets then chunked(KEYS, function(...) redis.call('ZREM', KEYS[2], ...) end, first, last) end
end
"""
    + redis_visits.WRITE_LUA
    + redis_dedup.COMMIT_LUA
    + """
local head = cjson.decode(ARGV[1])
local meta = KEYS[1]
local stored = redis.call('HMGET', meta, 'offset', 'rev', 'seen')
if tonumber(stored[1] or -1) ~= head[1] then return false end
if head[2] >= 0 and tonumber(stored[2] or 0) ~= head[2] then return false end
if (stored[3] or '') ~= head[3] then return false end
-- ``rev`` changes with every commit: readers cache a partition while its meta is the same, and
-- after one commit re-read only the hashes it names in ``touched``, with its ``rev``.
local rev = redis.call('HINCRBY', meta, 'rev', 1)
redis.call('HSET', meta, 'touched', rev .. ' ' .. head[7], unpack(head[4]))
local base, at = 2, 2
for _, part in ipairs(head[6]) do
  local name, count = part[1], part[2]
  if name == 'expired' then delete(base, count, true)
  elseif name == 'apply' then apply(base, ARGV[at])
  elseif name == 'visits' then write_visits(base, ARGV[at], ARGV[at + 1])
  elseif name == 'drop' then delete(base, count, false)
  elseif name == 'ids' then append_ids(base, count, at)
  end
  base, at = base + count, at + part[3]
end
return {rev, redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. head[5])}
"""
)


@dataclass(slots=True)
class _Parts:
    """The keys, arguments and parts of one call of :data:`_COMMIT_LUA`."""

    keys: list[str | bytes]
    parts: list[tuple[str, int, int]] = field(default_factory=list)
    args: list[str | bytes | int] = field(default_factory=list)

    def add(self, name: str, keys: Sequence[str | bytes], *args: str | bytes | int) -> None:
        """A part: its keys follow those of the parts before it."""
        self.parts.append((name, len(keys), len(args)))
        self.keys += keys
        self.args += args


def _text(value: object) -> str:
    """A reply's bytes as text (``None``: empty)."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


class StoreLayoutError(Exception):
    """A partition's keys were written by another store layout: they cannot be read as this one."""


class RedisStore:
    """The shared store, in Redis.

    Args:
        redis: An asyncio Redis client (``decode_responses=False``).
        partitions: How many partitions the events topic has.
        prefix: Prefix of every key.
        unique_ttl_s: Wall-clock lifetime of a distinct-count bucket.
        read_cache_max_age_s: Longest time :meth:`read` reuses what it read before without
            reading it again (see :mod:`agents.redis_read`).
        clock: Monotonic seconds, for the read cache's ages.
    """

    def __init__(
        self,
        redis: Redis,
        partitions: int,
        prefix: str = "kpi",
        unique_ttl_s: int = 259200,
        read_cache_max_age_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.redis = redis
        self.partitions = partitions
        self.prefix = prefix
        self.unique_ttl_s = unique_ttl_s
        # Per partition, the commit count (meta's ``rev``) as of this worker's last read or
        # commit: the fence of :meth:`commit`, with the applied offset.
        self._revs: dict[int, int] = {}
        self._reader = SnapshotReader(redis, partitions, self, read_cache_max_age_s, clock)
        self._commit_script = redis.register_script(_COMMIT_LUA)
        self._fetch_script = redis.register_script(redis_visits.FETCH_LUA)
        # Per partition, its counted ids as of its last load or commit (see agents.redis_dedup),
        # and the last fetch's view of the due shards for the next commit (agents.redis_visits).
        self._indexes: dict[int, DigestIndex] = {}
        self._scans: dict[int, Scan] = {}
        # Per partition, the last look-up's ids and their digests: its commit stores those of
        # the ids it counted (hashing each id once per step, not twice).
        self._digests: dict[int, tuple[Sequence[str], list[bytes]]] = {}
        # Per partition, the keys its last fetch asked for or returned as due, encoded, with their
        # shards: its commit writes most of them.
        self._fields: dict[int, dict[VisitKey, tuple[str, int]]] = {}
        # Per partition, the window buckets past retention its last commit found: its next
        # commit deletes them.
        self._expired: dict[int, list[bytes]] = {}
        self._open_keys: dict[int, list[str]] = {}  # see open_keys

    def key(self, partition: int, name: str) -> str:
        """A key of one partition's state."""
        return f"{self.prefix}:{{p{partition}}}:{name}"

    def open_keys(self, partition: int) -> list[str]:
        """The names of a partition's open-visit hashes, by shard (made once: a step names
        nearly one per visit it fetches or writes)."""
        names = self._open_keys.get(partition)
        if names is None:
            names = [self.key(partition, f"open:{s}") for s in range(redis_visits.OPEN_SHARDS)]
            self._open_keys[partition] = names
        return names

    def unique_key(self, campaign: str, kind: str, bucket_ms: int, start_ms: int) -> str:
        """The HyperLogLog of one campaign's bucket."""
        return f"{self.prefix}:{{c:{campaign}}}:u:{kind}:{bucket_ms}:{start_ms}"

    def unique_version_key(self, campaign: str) -> str:
        """The version of a campaign's HyperLogLogs: incremented whenever an add changed one."""
        return f"{self.prefix}:{{c:{campaign}}}:uver"

    def marker_key(self) -> str:
        """The store's identity marker."""
        return f"{self.prefix}:store"

    async def marker(self, create: bool) -> str | None:
        key = self.marker_key()
        if create:
            identity = {"id": uuid.uuid4().hex, "created_ms": int(time.time() * 1000)}
            await self.redis.set(key, orjson.dumps(identity), nx=True)
        value = await self.redis.get(key)
        return value.decode() if isinstance(value, bytes) else value

    async def load(self, partition: int) -> PartitionSnapshot:
        meta = await self._load_meta_and_ids(partition)
        if not meta:
            self._revs[partition] = 0
            return PartitionSnapshot()
        watermark = Watermark(
            watermark_ms=int(meta[b"watermark_ms"]),
            newest_event_ms=int(meta[b"newest_event_ms"]),
            anchor_ms=int(meta[b"watermark_ms"]),
        )
        open_visits = int(meta.get(b"open_visits", 0))
        self._revs[partition] = int(meta.get(b"rev", 0))
        return PartitionSnapshot(int(meta[b"offset"]), watermark, {}, open_visits)

    async def _load_meta_and_ids(self, partition: int) -> dict[bytes | str, bytes | str]:
        """The partition's meta hash, and its counted ids read into memory, as of one moment."""
        meta_key, prefix = self.key(partition, "meta"), self.key(partition, "seen:")
        meta = await self.redis.hgetall(meta_key)
        for _ in range(10):
            if meta and meta.get(b"layout") != LAYOUT.encode():
                raise StoreLayoutError(
                    f"partition {partition} under prefix {self.prefix!r} was written by another "
                    "store layout: rebuild the KPIs by a replay into a new KPI_REDIS_PREFIX "
                    "(docs/reliability.md)"
                )
            generations = parse_generations(meta.get(b"seen"))
            keys = {g.gen: redis_dedup.generation_keys(prefix, g) for g in generations}
            # The strings of the table just read, and the meta again, in one transaction: the
            # table is the one they were read with if the meta did not change meanwhile.
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(meta_key)
                for some in keys.values():
                    for key in some:
                        pipe.get(key)
                again, *strings = await pipe.execute()
            if again == meta:
                at, digests = 0, {}
                for gen, some in keys.items():
                    digests[gen] = b"".join(strings[at : at + len(some)])
                    at += len(some)
                self._indexes[partition] = DigestIndex(generations, digests)
                return meta
            meta = again
        raise RuntimeError(f"partition {partition}: committed to while being loaded; retrying")

    async def _index(self, partition: int) -> DigestIndex:
        """The partition's counted ids in memory; loaded first if this store has not (the worker
        always loads a partition before anything else)."""
        if partition not in self._indexes:
            await self.load(partition)
        return self._indexes[partition]

    def forget(self, partition: int) -> None:
        self._indexes.pop(partition, None)
        self._digests.pop(partition, None)
        self._scans.pop(partition, None)
        self._fields.pop(partition, None)

    async def visits(self, partition: int, needs: VisitNeeds) -> dict[VisitKey, list[Visit]]:
        # 1. The shards whose bound says they may hold a visit to close (their keys must be
        #    named in the script's KEYS, so this is a round trip of its own).
        due = await self.redis.zrangebyscore(
            self.key(partition, "due"), "-inf", f"({needs.last_before_ms}"
        )
        # 2. One script: those shards' due entries, and the entries of the keys asked for.
        keys = [self.key(partition, "meta")]
        index: dict[int, int] = {}
        open_keys = self.open_keys(partition)
        for s in due:
            shard = int(_text(s))
            keys.append(open_keys[shard])
            index[shard] = len(keys)
        plan = [len(index), *index.values()]
        # Each key encoded once, here: its commit writes most of them (see _fields).
        fields = self._fields[partition] = {}
        wanted: defaultdict[int, list[VisitKey]] = defaultdict(list)  # in scanned shards
        lone: list[VisitKey] = []  # the others, each with its shard's key
        lone_names: list[str] = []
        for key in needs.keys:
            name = encode_key(key)
            fields[key] = name, (shard := open_shard(name))
            if shard in index:
                wanted[shard].append(key)
            else:
                lone.append(key)
                lone_names.append(name)
                keys.append(open_keys[shard])
        if not index and not lone:
            self._scans.pop(partition, None)  # nothing scanned: the commit only lowers bounds
            return {}
        order: list[VisitKey] = []  # the keys asked: the reply's order
        for shard, some in wanted.items():
            plan += (index[shard], len(some))
            order += some
        asked = [fields[key][0] for key in order] + lone_names
        order += lone
        args: list[int | bytes] = [needs.last_before_ms, orjson.dumps(plan), orjson.dumps(asked)]
        del wanted, asked  # big for big batches: only their JSON waits for the reply
        offset, scans, found = await self._fetch_script(keys=keys, args=args)
        shard_at = {i: shard for shard, i in index.items()}
        scan = Scan(int(offset))
        # The values, all decoded together (decode_many): the due entries', then those asked.
        returned: list[bytes] = []
        values: list[bytes] = []
        at: list[tuple[ScannedShard, int]] = []
        for i, low, entries in scans:
            shard = shard_at[i]
            seen = scan.shards[shard] = ScannedShard(None if low < 0 else low)
            if entries:
                returned += entries[::2]
                values += entries[1::2]
                at += [(seen, shard)] * (len(entries) // 2)
        present = [key for key, value in zip(order, found, strict=True) if value is not None]
        values += [value for value in found if value is not None]
        decoded = decode_many(values)
        out: dict[VisitKey, list[Visit]] = {}
        held = needs.held
        for raw, visits, (seen, shard) in zip(returned, decoded[: len(returned)], at, strict=True):
            field_ = raw.decode()
            seen.returned[field_] = visits[0].last_ms  # the text's first visit: its due time
            if (key := decode_key(field_)) not in held:
                out[key] = visits
                fields[key] = field_, shard  # mostly closed by the step: its commit deletes it
        asked_found = decoded[len(returned) :]
        out.update(zip(present, asked_found, strict=True))
        # Each text's first visit has its due time (see stream.visits.encode_visits).
        scan.dues = {k: visits[0].last_ms for k, visits in zip(present, asked_found, strict=True)}
        self._scans[partition] = scan
        return out

    async def seen(self, partition: int, event_ids: Sequence[str]) -> set[str]:
        if not event_ids:
            return set()
        index = await self._index(partition)
        each = [digest(i) for i in event_ids]
        self._digests[partition] = event_ids, each
        found = index.contains(b"".join(each))
        return {event_ids[i] for i in np.flatnonzero(found).tolist()}

    async def add_uniques(self, uniques: UniqueAdds) -> None:
        if not uniques:
            return
        # One script call per campaign: its keys share the campaign's hash tag (one slot).
        per_campaign: dict[str, tuple[list[str], list[list[str]]]] = {}
        for (campaign, kind, bucket_ms, start_ms), members in uniques.items():
            keys, sets = per_campaign.setdefault(campaign, ([], []))
            keys.append(self.unique_key(campaign, kind, bucket_ms, start_ms))
            sets.append(list(members))
        async with self.redis.pipeline(transaction=False) as pipe:
            for campaign, (keys, sets) in per_campaign.items():
                keys.append(self.unique_version_key(campaign))
                # EVAL: redis-py would first check that an EVALSHA's script is loaded, a round
                # trip per call of this method.
                pipe.eval(_PFADD_LUA, len(keys), *keys, orjson.dumps(sets), self.unique_ttl_s)
            await pipe.execute()

    async def commit(self, delta: Delta, expected_offset: int, dedup_retention_ms: int) -> bool:
        p = delta.partition
        scan = self._scans.pop(p, None)
        fields = self._fields.pop(p, {})
        digests = self._counted_digests(p, delta.seen)
        expired = self._expired.pop(p, [])
        index = await self._index(p)
        assumed = index.text
        wm = delta.watermark
        roll = redis_dedup.advance(
            index.generations, wm.watermark_ms, dedup_retention_ms, len(delta.seen)
        )
        # The fetch's view of the due shards holds only if nothing was committed since: the
        # offset is checked here, the commit count by the script's fence.
        valid_scan = scan if scan is not None and scan.offset == expected_offset else None
        meta = ["offset", str(delta.offset), "watermark_ms", str(wm.watermark_ms)]
        meta += ("newest_event_ms", str(wm.newest_event_ms), "open_visits", str(delta.open_visits))
        meta += ("layout", LAYOUT, "seen", redis_dedup.format_generations(roll.generations))
        parts = _Parts([self.key(p, "meta"), self.key(p, "wb")])
        if expired:
            parts.add("expired", expired)
        touched = self._add_sums(parts, delta)
        writes = redis_visits.write_plan(delta.visits, valid_scan, fields)
        del fields
        if writes.shards or writes.lone:
            open_keys = self.open_keys(p)
            visit_keys = [self.key(p, "due"), *[open_keys[s] for s in writes.key_shards()]]
            parts.add("visits", visit_keys, *writes.arguments())
        self._add_dedup(parts, p, roll, digests)
        head = [
            expected_offset,
            self._revs.get(p, -1),
            assumed,
            meta,
            str(wm.newest_event_ms - RETENTION_MS),  # the oldest window bucket kept
            parts.parts,
            " ".join(touched),
        ]
        reply = await self._commit_script(keys=parts.keys, args=[orjson.dumps(head), *parts.args])
        if not reply:
            return False  # fenced out: another worker committed since this one read
        rev, self._expired[p] = reply
        self._revs[p] = int(rev)
        index.committed(roll, digests)
        return True

    def _counted_digests(self, p: int, counted: list[str]) -> bytes:
        """The digests of a step's ``counted`` ids, end to end (in any order), from the step's
        look-up (:meth:`seen`, which the commit follows)."""
        asked, each = self._digests.pop(p, ((), []))
        if counted == asked:
            # Every id looked up was counted (the common case: no duplicate, nothing to forward;
            # both in the order of their events, the same string objects: compared at C speed).
            return b"".join(each)
        known = dict(zip(asked, each, strict=True))
        return b"".join([known.get(i) or digest(i) for i in counted])

    def _add_sums(self, parts: _Parts, delta: Delta) -> list[str]:
        """The part of the counters, pipeline totals and window sums (see ``apply`` in
        :data:`_COMMIT_LUA`): per hash, increments, marks and window start. Returns the names
        of the hashes it changes (see :func:`agents.redis_read.touched`)."""
        p = delta.partition
        names: list[str] = []
        ops: list[tuple[list[str], list[str], int]] = []
        counters = [
            x
            for (campaign, counter), n in delta.counters.items()
            for x in (f"{campaign}{SEP}{counter}", str(n))
        ]
        pipeline = [x for name, n in delta.pipeline.items() for x in (name, str(n))]
        for name, increments in (("cnt", counters), ("pipe", pipeline)):
            if increments:
                names.append(name)
                ops.append((increments, [], -1))
        buckets: dict[tuple[int, int], tuple[list[str], list[str]]] = {}
        for (bucket_ms, start_ms, campaign, name), value in delta.windows.items():
            bucket = buckets.get((bucket_ms, start_ms))
            if bucket is None:
                bucket = buckets[bucket_ms, start_ms] = ([], [])
            # A mark (see stream.partition.UNIQUE_MARK) is set, not summed: idempotent.
            if name.startswith(UNIQUE_MARK):
                bucket[1].append(f"{campaign}{SEP}{name}")
            else:
                bucket[0].extend((f"{campaign}{SEP}{name}", str(value)))
        for (bucket_ms, start_ms), (increments, marks) in buckets.items():
            names.append(f"w:{bucket_ms}:{start_ms}")
            ops.append((increments, marks, start_ms))
        if ops:
            parts.add("apply", [self.key(p, name) for name in names], orjson.dumps(ops))
        return names

    def _add_dedup(self, parts: _Parts, p: int, roll: redis_dedup.Roll, digests: bytes) -> None:
        """The parts of the counted ids: the generations dropped, the ids appended."""
        prefix = self.key(p, "seen:")
        for generation in roll.dropped:
            parts.add("drop", redis_dedup.generation_keys(prefix, generation))
        if digests and roll.target is not None:
            keys, strings = zip(*redis_dedup.appends(prefix, roll.target, digests), strict=True)
            parts.add("ids", keys, *strings)

    async def read(self) -> KpiSnapshot:
        return await self._reader.read()
