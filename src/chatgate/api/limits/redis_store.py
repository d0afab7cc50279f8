"""Per-key counters in Redis, shared by every API server replica pointed at it.

Each key has a sorted set of admitted requests and one of charged tokens (scored by Redis's own
clock, so replicas' clocks need not agree) and a sorted set of parallel-slot leases scored by
when they lapse. Checking and counting is one Lua script, so two replicas can never both take
the last slot. Every Redis key expires on its own (a minute, or one lease lifetime), so nothing
a request left behind outlives it for long, whatever happened to the replica or the network.

Redis errors are this module's foreign errors: their text (which names the Redis address) is
logged here and never reaches a client.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chatgate.api.limits.policy import KeyPolicy
from chatgate.api.limits.store import LEASE, WINDOW, Usage
from chatgate.errors import NoHealthyWorkerError

log = logging.getLogger(__name__)

# Redis time in ms, as the first lines of every script compute it.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: requests zset, tokens zset, leases zset.
# ARGV: rpm, tpm, max parallel (0: none), member (the request's id, and its lease's), window (ms),
# lease lifetime (ms).
# Returns: refused ("" if admitted), requests, ms to oldest request's expiry, tokens, ms to oldest tokens'.
_ADMIT = _NOW + """
local window, lease = tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local rpm, tpm, parallel = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local count = redis.call('ZCARD', KEYS[1])
local used = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  used = used + tonumber(string.match(member, ':(%d+)$'))
end
local active = redis.call('ZCARD', KEYS[3])
local refused = ''
if parallel > 0 and active >= parallel then refused = 'parallel'
elseif rpm > 0 and count >= rpm then refused = 'requests'
elseif tpm > 0 and used >= tpm then refused = 'tokens' end
if refused == '' then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  count = count + 1
  if parallel > 0 then
    redis.call('ZADD', KEYS[3], now + lease, ARGV[4])
    redis.call('PEXPIRE', KEYS[3], lease)
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
_CHARGE = _NOW + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
"""

# KEYS: leases zset. ARGV: lease id, lease lifetime (ms). Returns 1 if renewed, 0 if lapsed.
# Every live lease lapses no later than now + lifetime, so that is the set's own expiry too.
_RENEW = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# Seconds a call to Redis may take: a Redis that hangs must not hang requests.
TIMEOUT = 2.0

UNAVAILABLE = "The rate-limit store is unavailable; retry shortly."


class RedisStore:
    """The `LimitStore` over Redis (`--redis-url`)."""

    def __init__(self, url: str, *, prefix: str = "chatgate:limits", lease_seconds: float = LEASE) -> None:
        # One immediate retry: a pooled connection Redis dropped (a restart) reconnects; more
        # would only keep a request waiting on a Redis that is down.
        self._redis: Any = redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 1)
        )
        self._prefix = prefix
        self.lease_seconds = lease_seconds
        self._admit = self._redis.register_script(_ADMIT)
        self._charge = self._redis.register_script(_CHARGE)
        self._renew = self._redis.register_script(_RENEW)

    def _keys(self, key: str) -> list[str]:
        return [f"{self._prefix}:{key}:{part}" for part in ("requests", "tokens", "leases")]

    async def admit(self, key: str, policy: KeyPolicy) -> Usage:
        member = uuid.uuid4().hex
        args: list[str | int] = [
            policy.rpm or 0, policy.tpm or 0, policy.max_parallel_requests or 0, member,
            int(WINDOW * 1000), self._lease_ms(),
        ]
        try:
            refused, requests, requests_reset, tokens, tokens_reset = await self._admit(keys=self._keys(key), args=args)
        except redis.RedisError as exc:  # fail closed: no limit is better enforced by refusing
            log.warning("rate-limit store unavailable at admission: %s", exc)
            raise NoHealthyWorkerError(UNAVAILABLE) from None
        refused = (refused.decode() if isinstance(refused, bytes) else refused) or None
        return Usage(
            refused=refused,
            requests=int(requests),
            requests_reset=int(requests_reset) / 1000,
            tokens=int(tokens),
            tokens_reset=int(tokens_reset) / 1000,
            lease=member if refused is None and policy.max_parallel_requests is not None else None,
        )

    async def charge(self, key: str, tokens: int) -> None:
        await self._charge(keys=self._keys(key)[1:2], args=[f"{uuid.uuid4().hex}:{tokens}", int(WINDOW * 1000)])

    async def renew(self, key: str, lease: str) -> bool:
        return bool(await self._renew(keys=self._keys(key)[2:], args=[lease, self._lease_ms()]))

    async def release(self, key: str, lease: str) -> None:
        await self._redis.zrem(self._keys(key)[2], lease)

    async def close(self) -> None:
        await self._redis.aclose()

    def _lease_ms(self) -> int:
        return max(1, int(self.lease_seconds * 1000))
