"""One contract for both limit stores, run over the in-memory store and a real Redis: parallel
slots are leases that lapse unless renewed, releases free only their own slot, and nothing a
request leaves behind outlives one lease lifetime."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from chatgate.api.limits.policy import KeyPolicy
from chatgate.api.limits.redis_store import RedisStore
from chatgate.api.limits.store import LimitStore, MemoryStore
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio

LEASE = 0.5  # seconds: short, so lapsing is quick to watch
PAR = KeyPolicy(max_parallel_requests=1)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[LimitStore]:
    made: LimitStore
    if request.param == "memory":
        made = MemoryStore(lease_seconds=LEASE)
    else:
        made = RedisStore(request.getfixturevalue("redis_url"), lease_seconds=LEASE)
    try:
        yield made
    finally:
        await made.close()


async def _admitted(store: LimitStore) -> bool:
    return (await store.admit("k", PAR)).refused is None


async def test_a_release_frees_its_own_slot_only(store: LimitStore) -> None:
    first = await store.admit("k", PAR)
    assert first.refused is None and first.lease
    assert (await store.admit("k", PAR)).refused == "parallel"
    await store.release("k", first.lease)
    second = await store.admit("k", PAR)
    assert second.refused is None and second.lease and second.lease != first.lease
    await store.release("k", first.lease)  # a repeated release must not free the second's slot
    assert (await store.admit("k", PAR)).refused == "parallel"
    assert (await store.admit("other", PAR)).refused is None  # keys are counted apart


async def test_a_lease_never_released_lapses_and_refusals_do_not_extend_it(store: LimitStore) -> None:
    assert (await store.admit("k", PAR)).lease
    # Refused admissions all along: none of them may push the lost lease's end out.
    waited = await apoll(lambda: _admitted(store), what="the unreleased lease lapsing", timeout=LEASE * 6)
    assert waited >= LEASE / 2


async def test_renewing_keeps_a_lease_and_a_lapsed_lease_stays_lapsed(store: LimitStore) -> None:
    lease = (await store.admit("k", PAR)).lease
    assert lease
    for _ in range(6):  # two lifetimes' worth of renewals
        await asyncio.sleep(LEASE / 3)  # time passing is what is tested
        assert await store.renew("k", lease)
        assert (await store.admit("k", PAR)).refused == "parallel"
    await asyncio.sleep(LEASE * 1.5)
    assert not await store.renew("k", lease)
    assert await _admitted(store)  # and renewing did not take the slot back


async def test_keys_without_a_parallel_limit_hold_no_lease(store: LimitStore) -> None:
    policy = KeyPolicy(tpm=100)
    assert (await store.admit("k", policy)).lease is None
    await store.charge("k", 60)
    await store.charge("k", 40)
    over = await store.admit("k", policy)
    assert over.refused == "tokens" and over.tokens == 100 and over.lease is None


async def test_redis_keeps_nothing_longer_than_a_window_or_a_lease(redis_url: str) -> None:
    store = RedisStore(redis_url, lease_seconds=LEASE)
    try:
        await store.admit("k", KeyPolicy(rpm=10, tpm=10, max_parallel_requests=2))
        await store.charge("k", 3)
    finally:
        await store.close()
    client = redis.from_url(redis_url)
    try:
        ttls = {key.decode(): await client.pttl(key) async for key in client.scan_iter("chatgate:limits:*")}
    finally:
        await client.aclose()
    assert set(ttls) == {f"chatgate:limits:k:{part}" for part in ("requests", "tokens", "leases")}
    assert all(0 < ttl <= 60_000 for ttl in ttls.values()), ttls
    assert 0 < ttls["chatgate:limits:k:leases"] <= LEASE * 1000
