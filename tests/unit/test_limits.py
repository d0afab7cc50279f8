"""Sliding windows and header formats of the per-key limits, on a controlled clock; and the
limits middleware holding a parallel slot's lease (renewed while the request runs, its release
retried when it fails)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message, Receive, Scope, Send

from chatgate.api.auth import Caller, caller
from chatgate.api.limits.middleware import RateLimitMiddleware
from chatgate.api.limits.policy import KeyPolicy
from chatgate.api.limits.store import MemoryStore, duration
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio


def test_durations_read_like_openais() -> None:
    assert [duration(s) for s in (0.012, 0.0, 1, 1.5, 59.9996, 360, 90.25)] == ["12ms", "0ms", "1s", "1.5s", "1m0s", "6m0s", "1m30.25s"]


async def test_request_window_slides() -> None:
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    policy = KeyPolicy(rpm=2)
    assert (await store.admit("k", policy)).refused is None
    now[0] += 30
    second = await store.admit("k", policy)
    assert second.refused is None and second.requests == 2 and second.requests_reset == pytest.approx(30)
    refused = await store.admit("k", policy)
    assert refused.refused == "requests" and refused.retry_after() == pytest.approx(30)
    now[0] += 30.001  # the first request has left the window
    assert (await store.admit("k", policy)).refused is None


async def test_tokens_and_parallel_slots() -> None:
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    policy = KeyPolicy(tpm=100, max_parallel_requests=1)
    lease = (await store.admit("k", policy)).lease
    assert lease is not None
    assert (await store.admit("k", policy)).refused == "parallel"
    await store.charge("k", 100)
    await store.release("k", lease)
    over = await store.admit("k", policy)
    assert over.refused == "tokens" and over.tokens == 100 and dict(over.headers(policy))["x-ratelimit-remaining-tokens"] == "0"
    now[0] += 61
    assert (await store.admit("k", policy)).refused is None


# The middleware's leases ------------------------------------------------------------------------

PAR = KeyPolicy(max_parallel_requests=1)


class FlakyStore(MemoryStore):
    """A memory store whose next `failures` releases fail, as a Redis blip would make them."""

    def __init__(self, failures: int, lease_seconds: float = 30.0) -> None:
        super().__init__(lease_seconds=lease_seconds)
        self.failures = failures

    async def release(self, key: str, lease: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("Error 111 connecting to redis.internal:6379")
        await super().release(key, lease)


async def request(app: RateLimitMiddleware) -> int:
    """One request with the limited key through `app`; its status."""
    scope: Scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                    "headers": [(b"authorization", b"Bearer sk-par")]}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    # The caller the identity layer would have parsed from that header.
    token = caller.set(Caller(digest="d", store_key="sk-par", policy=PAR))
    try:
        await app(scope, receive, send)
    finally:
        caller.reset(token)
    return int(sent[0]["status"])


def limited(
    store: MemoryStore, inner: asyncio.Future[None] | None = None, entered: asyncio.Event | None = None
) -> RateLimitMiddleware:
    """The middleware around an app that answers 200 (once `inner` is done, if given)."""

    async def ok(scope: Scope, receive: Receive, send: Send) -> None:
        if entered is not None:
            entered.set()
        if inner is not None:
            await inner
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return RateLimitMiddleware(ok, store=store)


async def test_a_failed_release_is_retried_until_the_slot_is_free() -> None:
    store = FlakyStore(failures=2)
    app = limited(store)
    assert await request(app) == 200  # its release fails, and is retried in the background
    assert await request(app) == 429
    await apoll(lambda: store.failures == 0, what="the release retried", timeout=5)
    await apoll(lambda: _status_is(app, 200), what="the slot given back", timeout=5)
    await app.leases.close()


async def _status_is(app: RateLimitMiddleware, status: int) -> bool:
    return await request(app) == status


async def test_a_long_request_renews_its_lease_and_frees_it_when_done() -> None:
    store = FlakyStore(failures=0, lease_seconds=0.3)
    done = asyncio.get_running_loop().create_future()
    app = limited(store, done)
    running = asyncio.create_task(request(app))
    for _ in range(10):  # a second: more than three lease lifetimes
        await asyncio.sleep(0.1)
        assert await request(limited(store)) == 429
    done.set_result(None)
    assert await running == 200
    assert await request(limited(store)) == 200  # released at once, not left to lapse


async def test_a_cancelled_request_gives_its_slot_back() -> None:
    store = FlakyStore(failures=0)
    entered = asyncio.Event()
    running = asyncio.create_task(request(limited(store, asyncio.get_running_loop().create_future(), entered)))
    await entered.wait()
    assert await request(limited(store)) == 429
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert await request(limited(store)) == 200
