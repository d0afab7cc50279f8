"""Stored responses in Redis (`--redis-url`), shared by every API replica pointed at it.

A record is a hash and its events a list, both expiring by Redis's own key TTL. The count and
bytes bounds are per owner (a key), kept by an index (a sorted set of all ids by expiry, hashes
of their sizes and owners, and per owner a sorted set of its ids and a running total of its
bytes) that every write updates in one Lua script, so replicas never disagree on what fits; an
owner over its quota loses its own oldest, never another owner's. Keys are named from the prefix inside the scripts, so this needs a
single Redis (not a cluster). How durable a write is depends on the Redis's own persistence
(`appendonly yes` with `appendfsync always` for nothing acknowledged to be lost).

Redis errors are this module's foreign errors: their text (which names the Redis address) is
logged here and never reaches a client, who gets a 503.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chatgate.api.stored.backend import Bounds, Record
from chatgate.errors import NoHealthyWorkerError

log = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT = 2.0  # seconds a call may take: a Redis that hangs must not hang requests
UNAVAILABLE = "The response store is unavailable; retry shortly."

# KEYS: index zset (every id by expiry), sizes hash, owners hash; per owner (named from ARGV[1],
# the prefix) a zset of its ids by expiry and its bytes total. `unindex` takes an id out of the
# index, `forget` also deletes its record and events.
_FORGET = """
local function unindex(member)
  local s = tonumber(redis.call('HGET', KEYS[2], member) or '0')
  local o = redis.call('HGET', KEYS[3], member)
  redis.call('HDEL', KEYS[2], member)
  redis.call('HDEL', KEYS[3], member)
  redis.call('ZREM', KEYS[1], member)
  if o then
    redis.call('ZREM', ARGV[1] .. ':o:' .. o, member)
    if redis.call('DECRBY', ARGV[1] .. ':ob:' .. o, s) <= 0 then redis.call('DEL', ARGV[1] .. ':ob:' .. o) end
  end
end
local function forget(member)
  unindex(member)
  redis.call('DEL', ARGV[1] .. ':r:' .. member, ARGV[1] .. ':e:' .. member)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# ARGV: prefix, id, owner, status, data, ttl ms, max count, max bytes (both per owner),
# only-from ("" or "|a|b|"), "1" to replace the events with ARGV[11..], else "0". Returns 1 if
# written.
_PUT = _FORGET + """
local id, ttl, maxc, maxb = ARGV[2], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local rec, ev = ARGV[1] .. ':r:' .. id, ARGV[1] .. ':e:' .. id
local mine, mybytes = ARGV[1] .. ':o:' .. ARGV[3], ARGV[1] .. ':ob:' .. ARGV[3]
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do forget(member) end
if ARGV[9] ~= '' then
  local cur = redis.call('HGET', rec, 'status')
  if not cur or not string.find(ARGV[9], '|' .. cur .. '|', 1, true) then return 0 end
end
local esize = 0
if ARGV[10] == '1' then
  for i = 11, #ARGV do esize = esize + string.len(ARGV[i]) end
else
  esize = tonumber(redis.call('HGET', rec, 'esize') or '0')
end
local size = string.len(ARGV[5]) + esize
unindex(id)
if size > maxb then
  redis.call('DEL', rec, ev)
  return 0
end
while redis.call('ZCARD', mine) >= maxc or tonumber(redis.call('GET', mybytes) or '0') + size > maxb do
  local oldest = redis.call('ZRANGE', mine, 0, 0)[1]
  if not oldest then break end
  forget(oldest)
end
if ARGV[10] == '1' then
  redis.call('DEL', ev)
  for i = 11, #ARGV do redis.call('RPUSH', ev, ARGV[i]) end
end
redis.call('HSET', rec, 'owner', ARGV[3], 'status', ARGV[4], 'data', ARGV[5], 'size', size, 'esize', esize, 'updated', now)
redis.call('PEXPIRE', rec, ttl)
redis.call('PEXPIRE', ev, ttl)
redis.call('ZADD', KEYS[1], now + ttl, id)
redis.call('ZADD', mine, now + ttl, id)
redis.call('HSET', KEYS[2], id, size)
redis.call('HSET', KEYS[3], id, ARGV[3])
redis.call('INCRBY', mybytes, size)
return 1
"""

# ARGV: prefix, id. Returns 1 if there was a record.
_DELETE = _FORGET + """
local there = redis.call('EXISTS', ARGV[1] .. ':r:' .. ARGV[2])
forget(ARGV[2])
return there
"""

# ARGV: prefix, id, start, events... Appends events (numbered from start) to a kept record's.
_ADD_EVENTS = """
local rec, ev = ARGV[1] .. ':r:' .. ARGV[2], ARGV[1] .. ':e:' .. ARGV[2]
local ttl = redis.call('PTTL', rec)
if ttl <= 0 then return 0 end
local start = tonumber(ARGV[3])
if start == 0 then redis.call('DEL', ev) else redis.call('LTRIM', ev, 0, start - 1) end
local grown = 0
for i = 4, #ARGV do
  redis.call('RPUSH', ev, ARGV[i])
  grown = grown + string.len(ARGV[i])
end
redis.call('PEXPIRE', ev, ttl)
redis.call('HINCRBY', rec, 'esize', grown)
redis.call('HINCRBY', rec, 'size', grown)
redis.call('HINCRBY', KEYS[2], ARGV[2], grown)
local o = redis.call('HGET', KEYS[3], ARGV[2])
if o then redis.call('INCRBY', ARGV[1] .. ':ob:' .. o, grown) end
return 1
"""


class RedisBackend:
    """The `Backend` over Redis."""

    def __init__(self, url: str, bounds: Bounds, *, prefix: str = "chatgate:responses") -> None:
        self._redis: Any = redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 1)
        )
        self._bounds = bounds
        self._prefix = prefix
        self._index = [f"{prefix}:index", f"{prefix}:sizes", f"{prefix}:owners"]
        self._put = self._redis.register_script(_PUT)
        self._delete = self._redis.register_script(_DELETE)
        self._add = self._redis.register_script(_ADD_EVENTS)

    async def _call(self, what: str, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        except redis.RedisError as exc:
            log.warning("response store unavailable (%s): %s", what, exc)
            raise NoHealthyWorkerError(UNAVAILABLE) from None

    async def put(self, record: Record, *, events: list[str] | None = None, only_from: frozenset[str] | None = None) -> bool:
        b = self._bounds
        args = [
            self._prefix, record.id, record.owner, record.status, record.data, max(1, int(b.ttl * 1000)), b.max_count,
            b.max_bytes, "|" + "|".join(sorted(only_from)) + "|" if only_from is not None else "",
            "1" if events is not None else "0", *(events or []),
        ]
        return bool(await self._call("put", lambda: self._put(keys=self._index, args=args)))

    async def get(self, response_id: str) -> Record | None:
        key = f"{self._prefix}:r:{response_id}"

        async def read() -> tuple[list[Any], int]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hmget(key, "owner", "status", "data", "size", "updated")
                pipe.pttl(key)
                fields, ttl = await pipe.execute()
                return list(fields), int(ttl)

        fields, ttl = await self._call("get", read)
        if fields[0] is None or fields[2] is None or ttl <= 0:
            return None
        owner, status, data, size, updated = (f.decode() if isinstance(f, bytes) else f for f in fields)
        return Record(response_id, owner, status, data, int(size), time.time() + ttl / 1000, int(updated) / 1000)

    async def delete(self, response_id: str) -> bool:
        return bool(await self._call("delete", lambda: self._delete(keys=self._index, args=[self._prefix, response_id])))

    async def add_events(self, response_id: str, events: list[str], start: int) -> None:
        if events:
            await self._call("add events", lambda: self._add(keys=self._index, args=[self._prefix, response_id, start, *events]))

    async def events(self, response_id: str, start: int) -> list[str]:
        rows = await self._call("events", lambda: self._redis.lrange(f"{self._prefix}:e:{response_id}", max(0, start), -1))
        return [row.decode() if isinstance(row, bytes) else row for row in rows]

    async def close(self) -> None:
        await self._redis.aclose()
