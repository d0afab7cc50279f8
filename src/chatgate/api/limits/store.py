"""Counters behind the per-key limits: the `LimitStore` interface, what it reports (`Usage`),
and the in-memory store (one API server); `redis_store.py` shares them between replicas.

Windows slide over the last minute: a request counts for 60 s after it was admitted, tokens for
60 s after they were charged.

A parallel slot is a *lease*: an id with an expiry (`LEASE` seconds out) that the request renews
while it runs and gives back when it ends. Nothing else holds a slot, so a release that never
arrives (a Redis blip, a replica killed mid-request) costs the key that slot for at most one
lease lifetime, and no later request can extend it.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from chatgate.api.limits.policy import KeyPolicy

WINDOW = 60.0  # seconds
LEASE = 30.0  # seconds a parallel slot lives unless renewed


@dataclass(frozen=True)
class Usage:
    """A key's counters when a request was admitted (or refused), for headers and errors."""

    refused: str | None  # None, "parallel", "requests" or "tokens"
    requests: int  # in the window, this request included when admitted
    requests_reset: float  # seconds until the oldest counted request leaves the window
    tokens: int
    tokens_reset: float
    lease: str | None = None  # the parallel slot this request holds (renew it, then release it)

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

    lease_seconds: float

    async def admit(self, key: str, policy: KeyPolicy) -> Usage:
        """Refuse the request if a limit is reached; otherwise count it (and lease a parallel
        slot, `Usage.lease`, when the key has that limit)."""
        ...

    async def charge(self, key: str, tokens: int) -> None:
        """Add tokens a request used to the key's token window."""
        ...

    async def renew(self, key: str, lease: str) -> bool:
        """Push a live lease's expiry `lease_seconds` out; False if it has already lapsed
        (a lapsed lease is gone for good: renewing never takes a slot back)."""
        ...

    async def release(self, key: str, lease: str) -> None:
        """Give back a leased slot (nothing happens if it has lapsed or was released)."""
        ...

    async def close(self) -> None:
        """Drop connections."""
        ...


class MemoryStore:
    """Counters in this process (the default): exact, but not shared between replicas."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, lease_seconds: float = LEASE) -> None:
        self._clock = clock
        self.lease_seconds = lease_seconds
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._leases: dict[str, dict[str, float]] = {}  # key -> lease id -> expiry

    def _prune(self, key: str, now: float) -> tuple[deque[float], deque[tuple[float, int]]]:
        requests = self._requests.setdefault(key, deque())
        tokens = self._tokens.setdefault(key, deque())
        while requests and requests[0] <= now - WINDOW:
            requests.popleft()
        while tokens and tokens[0][0] <= now - WINDOW:
            tokens.popleft()
        return requests, tokens

    def _live_leases(self, key: str, now: float) -> dict[str, float]:
        leases = self._leases.setdefault(key, {})
        for lease in [lease for lease, expiry in leases.items() if expiry <= now]:
            del leases[lease]
        return leases

    async def admit(self, key: str, policy: KeyPolicy) -> Usage:
        now = self._clock()
        requests, tokens = self._prune(key, now)
        used = sum(n for _, n in tokens)
        leases = self._live_leases(key, now)
        refused = _refusal(policy, len(leases), len(requests), used)
        lease = None
        if refused is None:
            requests.append(now)
            if policy.max_parallel_requests is not None:
                lease = uuid.uuid4().hex
                leases[lease] = now + self.lease_seconds
        return Usage(
            refused=refused,
            requests=len(requests),
            requests_reset=requests[0] + WINDOW - now if requests else 0.0,
            tokens=used,
            tokens_reset=tokens[0][0] + WINDOW - now if tokens else 0.0,
            lease=lease,
        )

    async def charge(self, key: str, tokens: int) -> None:
        self._tokens.setdefault(key, deque()).append((self._clock(), tokens))

    async def renew(self, key: str, lease: str) -> bool:
        now = self._clock()
        leases = self._live_leases(key, now)
        if lease not in leases:
            return False
        leases[lease] = now + self.lease_seconds
        return True

    async def release(self, key: str, lease: str) -> None:
        self._leases.get(key, {}).pop(lease, None)

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
