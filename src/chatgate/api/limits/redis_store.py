"""Per-key counters in Redis, shared by every API server replica pointed at it.

Each key has a sorted set of admitted requests and one of charged tokens (scored by Redis's own
clock, so replicas' clocks need not agree) and a counter of requests in flight. Checking and
counting is one Lua script, so two replicas can never both take the last slot.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis.asyncio as redis

from chatgate.api.limits.policy import KeyPolicy
from chatgate.api.limits.store import WINDOW, Usage
from chatgate.errors import NoHealthyWorkerError

# KEYS: requests zset, tokens zset, in-flight counter.
# ARGV: rpm, tpm, max parallel (0: none), member, window (ms), slot lifetime (s).
# Returns: refused ("" if admitted), requests, ms to oldest request's expiry, tokens, ms to oldest tokens'.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local rpm, tpm, parallel = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local count = redis.call('ZCARD', KEYS[1])
local used = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  used = used + tonumber(string.match(member, ':(%d+)$'))
end
local active = tonumber(redis.call('GET', KEYS[3]) or '0')
local refused = ''
if parallel > 0 and active >= parallel then refused = 'parallel'
elseif rpm > 0 and count >= rpm then refused = 'requests'
elseif tpm > 0 and used >= tpm then refused = 'tokens' end
if refused == '' then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  count = count + 1
  if parallel > 0 then
    redis.call('INCR', KEYS[3])
    redis.call('EXPIRE', KEYS[3], tonumber(ARGV[6]))
  end
end
local function until_free(key)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]
  if oldest then return tonumber(oldest) + window - now end
  return 0
end
return {refused, count, until_free(KEYS[1]), used, until_free(KEYS[2])}
"""

# KEYS: tokens zset. ARGV: member (ends ":<tokens>"), window (ms).
_CHARGE = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
"""

# KEYS: in-flight counter.
_RELEASE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
"""

# A replica that dies mid-request never gives its slot back: slots lapse after this long.
SLOT_LIFETIME = 3600


class RedisStore:
    """The `LimitStore` over Redis (`--redis-url`)."""

    def __init__(self, url: str, *, prefix: str = "chatgate:limits") -> None:
        self._redis: Any = redis.from_url(url)
        self._prefix = prefix
        self._admit = self._redis.register_script(_ADMIT)
        self._charge = self._redis.register_script(_CHARGE)
        self._release = self._redis.register_script(_RELEASE)

    def _keys(self, key: str) -> list[str]:
        return [f"{self._prefix}:{key}:{part}" for part in ("requests", "tokens", "active")]

    async def admit(self, key: str, policy: KeyPolicy) -> Usage:
        args: list[str | int] = [policy.rpm or 0, policy.tpm or 0, policy.max_parallel_requests or 0, uuid.uuid4().hex, int(WINDOW * 1000), SLOT_LIFETIME]
        try:
            refused, requests, requests_reset, tokens, tokens_reset = await self._admit(keys=self._keys(key), args=args)
        except redis.RedisError as exc:  # fail closed: no limit is better enforced by refusing
            raise NoHealthyWorkerError(f"The rate-limit store is unavailable; retry shortly. ({exc})") from exc
        return Usage(
            refused=(refused.decode() if isinstance(refused, bytes) else refused) or None,
            requests=int(requests),
            requests_reset=int(requests_reset) / 1000,
            tokens=int(tokens),
            tokens_reset=int(tokens_reset) / 1000,
        )

    async def charge(self, key: str, tokens: int) -> None:
        await self._charge(keys=self._keys(key)[1:2], args=[f"{uuid.uuid4().hex}:{tokens}", int(WINDOW * 1000)])

    async def release(self, key: str, policy: KeyPolicy) -> None:
        if policy.max_parallel_requests is not None:
            await self._release(keys=self._keys(key)[2:])

    async def close(self) -> None:
        await self._redis.aclose()
