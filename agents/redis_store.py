"""The Redis implementation of :class:`stream.store.Store`.

Key design (``P`` a partition, ``C`` a campaign; ``{...}`` is the Redis Cluster hash tag):

=====================================  ===============================================  =======
key                                    holds                                            type
=====================================  ===============================================  =======
``kpi:{pP}:meta``                      applied offset, watermark, newest event time,    hash
                                       commit count (``rev``)
``kpi:{pP}:cnt``                       ``C\\x1f<counter>`` -> total                      hash
``kpi:{pP}:pipe``                      pipeline counters                                hash
``kpi:{pP}:open``                      visit key -> its open visits (compact text)      hash
``kpi:{pP}:due``                       visit keys by earliest last event time           zset
``kpi:{pP}:w:<bucket_ms>:<start_ms>``  ``C\\x1f<field>`` -> closed-visit sums            hash
``kpi:{pP}:wb``                        window bucket keys by start (for purging)        zset
``kpi:{pP}:seen``                      counted event ids, scored by watermark           zset
``kpi:{cC}:u:<kind>:<bucket_ms>:<s>``  distinct visitors / participants of a bucket     HLL
``kpi:{cC}:uver``                      version of the campaign's HLLs (changes on add)  string
``kpi:store``                          identity marker: random id and creation time     string
=====================================  ===============================================  =======

Every key a commit writes carries its partition's hash tag, so one ``MULTI``/``EXEC`` applies a
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

import orjson
from redis.asyncio import Redis
from redis.exceptions import WatchError

from agents.redis_read import SEP, SnapshotReader
from stream.kpis import KpiSnapshot
from stream.partition import UNIQUE_MARK, Delta, VisitNeeds
from stream.store import PartitionSnapshot, UniqueAdds
from stream.visits import Visit, VisitKey, decode_key, decode_visits, encode_key, encode_visits
from stream.watermark import Watermark
from stream.windows import RETENTION_MS

# Batches carry thousands of ids and members: redis-py encodes each command argument in Python,
# so these scripts take them as ONE JSON argument and loop in Redis (cjson decodes in C).
# ``unpack`` is chunked: Lua's stack holds a few thousand values at most.
_SEEN_LUA = """
local ids = cjson.decode(ARGV[1])
local found = {}
for i = 1, #ids do
  if redis.call('ZSCORE', KEYS[1], ids[i]) then found[#found + 1] = i - 1 end
end
return found
"""
_REMEMBER_LUA = """
local ids = cjson.decode(ARGV[1])
local score = ARGV[2]
for i = 1, #ids, 2000 do
  local args = {}
  for j = i, math.min(i + 1999, #ids) do
    args[#args + 1] = score
    args[#args + 1] = ids[j]
  end
  redis.call('ZADD', KEYS[1], unpack(args))
end
return #ids
"""
# Open visits: ``open`` maps a visit key to its visits, ``due`` indexes keys by their earliest
# last event time, so a step fetches the keys it touches plus those that may close.
_VISITS_LUA = """
local fields = cjson.decode(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2])
local taken, out = {}, {}
local function take(f)
  if not taken[f] then
    taken[f] = true
    local v = redis.call('HGET', KEYS[1], f)
    if v then
      out[#out + 1] = f
      out[#out + 1] = v
    end
  end
end
for i = 1, #fields do take(fields[i]) end
for i = 1, #due do take(due[i]) end
return out
"""
_WRITE_VISITS_LUA = """
local up = cjson.decode(ARGV[1])
for i = 1, #up do
  redis.call('HSET', KEYS[1], up[i][1], up[i][2])
  redis.call('ZADD', KEYS[2], up[i][3], up[i][1])
end
local gone = cjson.decode(ARGV[2])
for i = 1, #gone do
  redis.call('HDEL', KEYS[1], gone[i])
  redis.call('ZREM', KEYS[2], gone[i])
end
return #up
"""
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
        self._reader = SnapshotReader(redis, partitions, self, read_cache_max_age_s, clock)
        self._seen_script = redis.register_script(_SEEN_LUA)
        self._remember_script = redis.register_script(_REMEMBER_LUA)
        self._pfadd_script = redis.register_script(_PFADD_LUA)
        self._visits_script = redis.register_script(_VISITS_LUA)
        self._write_visits_script = redis.register_script(_WRITE_VISITS_LUA)

    def key(self, partition: int, name: str) -> str:
        """A key of one partition's state."""
        return f"{self.prefix}:{{p{partition}}}:{name}"

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
        meta = await self.redis.hgetall(self.key(partition, "meta"))
        if not meta:
            return PartitionSnapshot()
        watermark = Watermark(
            watermark_ms=int(meta[b"watermark_ms"]),
            newest_event_ms=int(meta[b"newest_event_ms"]),
            anchor_ms=int(meta[b"watermark_ms"]),
        )
        open_visits = int(meta.get(b"open_visits", 0))
        return PartitionSnapshot(int(meta[b"offset"]), watermark, {}, open_visits)

    async def visits(self, partition: int, needs: VisitNeeds) -> dict[VisitKey, list[Visit]]:
        fields = orjson.dumps(sorted({encode_key(k) for k in needs.keys}))
        flat = await self._visits_script(
            keys=[self.key(partition, "open"), self.key(partition, "due")],
            args=[fields, needs.last_before_ms],
        )
        return {
            decode_key(flat[i].decode()): decode_visits(flat[i + 1].decode())
            for i in range(0, len(flat), 2)
        }

    async def seen(self, partition: int, event_ids: Sequence[str]) -> set[str]:
        if not event_ids:
            return set()
        found = await self._seen_script(
            keys=[self.key(partition, "seen")], args=[orjson.dumps(list(event_ids))]
        )
        return {event_ids[i] for i in found}

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
                await self._pfadd_script(
                    keys=[*keys, self.unique_version_key(campaign)],
                    args=[orjson.dumps(sets), self.unique_ttl_s],
                    client=pipe,
                )
            await pipe.execute()

    async def commit(self, delta: Delta, expected_offset: int, dedup_retention_ms: int) -> bool:
        p = delta.partition
        meta = self.key(p, "meta")
        buckets_index = self.key(p, "wb")
        oldest_bucket_ms = delta.watermark.newest_event_ms - RETENTION_MS
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                await pipe.watch(meta)
                stored = await pipe.hget(meta, "offset")
                if (int(stored) if stored is not None else -1) != expected_offset:
                    return False
                expired = await pipe.zrangebyscore(buckets_index, "-inf", f"({oldest_bucket_ms}")
                pipe.multi()  # type: ignore[no-untyped-call]
                await self._write(pipe, delta, dedup_retention_ms)
                if expired:
                    pipe.delete(*expired)
                    pipe.zrem(buckets_index, *expired)
                await pipe.execute()
        except WatchError:
            return False
        return True

    async def _write(self, pipe: object, delta: Delta, dedup_retention_ms: int) -> None:
        """Queue the writes of ``delta`` on a ``MULTI`` pipeline."""
        p = delta.partition
        wm = delta.watermark
        # ``rev`` changes with every commit: readers cache a partition while its meta is the same.
        pipe.hincrby(self.key(p, "meta"), "rev", 1)  # type: ignore[attr-defined]
        pipe.hset(  # type: ignore[attr-defined]
            self.key(p, "meta"),
            mapping={
                "offset": delta.offset,
                "watermark_ms": wm.watermark_ms,
                "newest_event_ms": wm.newest_event_ms,
                "open_visits": delta.open_visits,
            },
        )
        counters = self.key(p, "cnt")
        for (campaign, name), value in delta.counters.items():
            pipe.hincrby(counters, f"{campaign}{SEP}{name}", value)  # type: ignore[attr-defined]
        pipeline = self.key(p, "pipe")
        for name, value in delta.pipeline.items():
            pipe.hincrby(pipeline, name, value)  # type: ignore[attr-defined]
        buckets: dict[tuple[int, int], list[tuple[str, int | None]]] = defaultdict(list)
        for (bucket_ms, start_ms, campaign, name), value in delta.windows.items():
            # A mark (see stream.partition.UNIQUE_MARK) is set, not summed: idempotent.
            mark = name.startswith(UNIQUE_MARK)
            buckets[bucket_ms, start_ms].append((f"{campaign}{SEP}{name}", None if mark else value))
        for (bucket_ms, start_ms), fields in buckets.items():
            key = self.key(p, f"w:{bucket_ms}:{start_ms}")
            for field, increment in fields:
                if increment is None:
                    pipe.hset(key, field, 1)  # type: ignore[attr-defined]
                else:
                    pipe.hincrby(key, field, increment)  # type: ignore[attr-defined]
            pipe.zadd(self.key(p, "wb"), {key: start_ms})  # type: ignore[attr-defined]
        if delta.visits:
            upserts, gone = [], []
            for visit_key, visits in delta.visits.items():
                field = encode_key(visit_key)
                if visits is None:
                    gone.append(field)
                else:
                    earliest_last = str(min(v.last_ms for v in visits))
                    upserts.append((field, encode_visits(visits), earliest_last))
            await self._write_visits_script(  # queued on the MULTI pipeline: in the transaction
                keys=[self.key(p, "open"), self.key(p, "due")],
                args=[orjson.dumps(upserts), orjson.dumps(gone)],
                client=pipe,  # type: ignore[arg-type]
            )
        seen = self.key(p, "seen")
        if delta.seen:
            await self._remember_script(  # queued on the MULTI pipeline: in the transaction
                keys=[seen],
                args=[orjson.dumps(delta.seen), wm.watermark_ms],
                client=pipe,  # type: ignore[arg-type]
            )
        horizon = wm.watermark_ms - dedup_retention_ms
        pipe.zremrangebyscore(seen, "-inf", f"({horizon}")  # type: ignore[attr-defined]

    async def read(self) -> KpiSnapshot:
        return await self._reader.read()
