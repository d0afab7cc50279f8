"""Sliding windows and header formats of the per-key limits, on a controlled clock."""

from __future__ import annotations

import pytest

from chatgate.api.limits.policy import KeyPolicy
from chatgate.api.limits.store import MemoryStore, duration

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
    assert (await store.admit("k", policy)).refused is None
    assert (await store.admit("k", policy)).refused == "parallel"
    await store.charge("k", 100)
    await store.release("k", policy)
    over = await store.admit("k", policy)
    assert over.refused == "tokens" and over.tokens == 100 and dict(over.headers(policy))["x-ratelimit-remaining-tokens"] == "0"
    now[0] += 61
    assert (await store.admit("k", policy)).refused is None
