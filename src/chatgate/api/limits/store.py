"""Counters behind the per-key limits: the `LimitStore` interface, what it reports (`Usage`),
and the in-memory store (one API server); `redis_store.py` shares them between replicas.

Windows slide over the last minute: a request counts for 60 s after it was admitted, tokens for
60 s after they were charged.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from chatgate.api.limits.policy import KeyPolicy

WINDOW = 60.0  # seconds


@dataclass(frozen=True)
class Usage:
    """A key's counters when a request was admitted (or refused), for headers and errors."""

    refused: str | None  # None, "parallel", "requests" or "tokens"
    requests: int  # in the window, this request included when admitted
    requests_reset: float  # seconds until the oldest counted request leaves the window
    tokens: int
    tokens_reset: float

    def retry_after(self) -> float:
        """Seconds before the refused limit may admit a request."""
        if self.refused == "requests":
            return self.requests_reset
        if self.refused == "tokens":
            return self.tokens_reset
        return 1.0

    def headers(self, policy: KeyPolicy) -> list[tuple[str, str]]:
        """OpenAI's `x-ratelimit-*` headers for the limits the key has."""
        out = []
        if policy.rpm is not None:
            out += _trio("requests", policy.rpm, self.requests, self.requests_reset)
        if policy.tpm is not None:
            out += _trio("tokens", policy.tpm, self.tokens, self.tokens_reset)
        return out


def _trio(kind: str, limit: int, used: int, reset: float) -> list[tuple[str, str]]:
    return [
        (f"x-ratelimit-limit-{kind}", str(limit)),
        (f"x-ratelimit-remaining-{kind}", str(max(0, limit - used))),
        (f"x-ratelimit-reset-{kind}", duration(reset)),
    ]


def duration(seconds: float) -> str:
    """A duration as OpenAI writes it in headers: `12ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{text}s" if minutes else f"{text}s"


class LimitStore(Protocol):
    """Where the counters live. `admit` checks and counts atomically."""

    async def admit(self, key: str, policy: KeyPolicy) -> Usage:
        """Refuse the request if a limit is reached; otherwise count it (and hold a parallel
        slot when the key has that limit)."""
        ...

    async def charge(self, key: str, tokens: int) -> None:
        """Add tokens a request used to the key's token window."""
        ...

    async def release(self, key: str, policy: KeyPolicy) -> None:
        """Give back the parallel slot an admitted request held."""
        ...

    async def close(self) -> None:
        """Drop connections."""
        ...


class MemoryStore:
    """Counters in this process (the default): exact, but not shared between replicas."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._active: Counter[str] = Counter()

    def _prune(self, key: str, now: float) -> tuple[deque[float], deque[tuple[float, int]]]:
        requests = self._requests.setdefault(key, deque())
        tokens = self._tokens.setdefault(key, deque())
        while requests and requests[0] <= now - WINDOW:
            requests.popleft()
        while tokens and tokens[0][0] <= now - WINDOW:
            tokens.popleft()
        return requests, tokens

    async def admit(self, key: str, policy: KeyPolicy) -> Usage:
        now = self._clock()
        requests, tokens = self._prune(key, now)
        used = sum(n for _, n in tokens)
        refused = _refusal(policy, self._active[key], len(requests), used)
        if refused is None:
            requests.append(now)
            if policy.max_parallel_requests is not None:
                self._active[key] += 1
        return Usage(
            refused=refused,
            requests=len(requests),
            requests_reset=requests[0] + WINDOW - now if requests else 0.0,
            tokens=used,
            tokens_reset=tokens[0][0] + WINDOW - now if tokens else 0.0,
        )

    async def charge(self, key: str, tokens: int) -> None:
        self._tokens.setdefault(key, deque()).append((self._clock(), tokens))

    async def release(self, key: str, policy: KeyPolicy) -> None:
        if policy.max_parallel_requests is not None and self._active[key] > 0:
            self._active[key] -= 1

    async def close(self) -> None:
        """Nothing to close."""


def _refusal(policy: KeyPolicy, active: int, requests: int, tokens: int) -> str | None:
    """Which limit refuses the next request, if any (the same rule as the Redis script's)."""
    if policy.max_parallel_requests is not None and active >= policy.max_parallel_requests:
        return "parallel"
    if policy.rpm is not None and requests >= policy.rpm:
        return "requests"
    if policy.tpm is not None and tokens >= policy.tpm:
        return "tokens"
    return None
