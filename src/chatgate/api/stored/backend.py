"""Where stored responses live: the `Backend` interface, the record it keeps, and the in-memory
backend (one process; tests and `--responses-store memory`). `sqlite.py` and `redis_backend.py`
keep the same records durably.

A backend keeps opaque strings (the JSON of a response and its conversation, and of its stream
events): encoding them is the caller's CPU work, done off the event loop. Every write is
committed before it returns, so a write that returned is acknowledged for good.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

# A response's states that may still change (a background response's); all others are final.
RUNNING = frozenset({"queued", "in_progress"})


@dataclass(frozen=True)
class Record:
    """One kept response as a backend keeps it: who owns it, its status (kept apart, so a write
    can be made conditional on it), its JSON, its size in bytes (its JSON and its events'),
    when it expires and when it was last written (epoch seconds)."""

    id: str
    owner: str
    status: str
    data: str
    size: int = 0
    expires: float = 0.0
    updated: float = 0.0


class Backend(Protocol):
    """Keeps records for `ttl` seconds, each with the stream events of its response in order, at
    most `max_count` of them and `max_bytes` together per owner: an owner over its quota loses its
    own oldest, never another owner's."""

    async def put(self, record: Record, *, events: list[str] | None = None, only_from: frozenset[str] | None = None) -> bool:
        """Write `record` (its expiry now plus the TTL; `events` replace its events when given).
        With `only_from`, only if a record of that id is kept with one of those statuses.
        Whether it was written."""

    async def get(self, response_id: str) -> Record | None:
        """The record of that id, unless it expired or was never kept."""

    async def delete(self, response_id: str) -> bool:
        """Forget a record and its events; whether there was one."""

    async def add_events(self, response_id: str, events: list[str], start: int) -> None:
        """Append events numbered from `start` to a kept record's."""

    async def events(self, response_id: str, start: int) -> list[str]:
        """A record's events from number `start` on."""

    async def close(self) -> None:
        """Release connections."""


@dataclass
class _Kept:
    record: Record
    events: list[str] = field(default_factory=list)


@dataclass
class Bounds:
    """What a backend may keep: for `ttl` seconds, and per owner (a key) `max_count` records
    and `max_bytes` together."""

    ttl: float
    max_count: int
    max_bytes: int


class MemoryBackend:
    """Records in this process's memory: lost on restart, not shared between replicas."""

    def __init__(self, bounds: Bounds, *, clock: Callable[[], float] = time.time) -> None:
        self._bounds = bounds
        self._clock = clock
        self._kept: OrderedDict[str, _Kept] = OrderedDict()  # oldest first: expiry order too
        self._bytes = 0
        # Per owner: its ids oldest first, and their bytes (the quota is counted per owner).
        self._owned: dict[str, OrderedDict[str, None]] = {}
        self._owned_bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._kept)

    @property
    def bytes(self) -> int:
        """The size of what is kept now."""
        with self._lock:
            self._expire()
            return self._bytes

    def _drop(self, response_id: str) -> None:
        kept = self._kept.pop(response_id, None)
        if kept is None:
            return
        owner = kept.record.owner
        self._bytes -= kept.record.size
        self._owned_bytes[owner] -= kept.record.size
        ids = self._owned[owner]
        del ids[response_id]
        if not ids:
            del self._owned[owner], self._owned_bytes[owner]

    def _make_room(self, owner: str, size: int) -> None:
        """Drop `owner`'s own oldest until one more record of `size` bytes fits its quota."""
        ids = self._owned.get(owner)
        while ids and (len(ids) >= self._bounds.max_count or self._owned_bytes[owner] + size > self._bounds.max_bytes):
            self._drop(next(iter(ids)))
            ids = self._owned.get(owner)

    def _expire(self) -> None:
        now = self._clock()
        while self._kept:
            oldest = next(iter(self._kept.values()))
            if oldest.record.expires > now:
                break
            self._drop(oldest.record.id)

    async def put(self, record: Record, *, events: list[str] | None = None, only_from: frozenset[str] | None = None) -> bool:
        with self._lock:
            self._expire()
            old = self._kept.get(record.id)
            if only_from is not None and (old is None or old.record.status not in only_from):
                return False
            kept_events = events if events is not None else (old.events if old is not None else [])
            size = len(record.data) + sum(map(len, kept_events))
            if size > self._bounds.max_bytes:
                self._drop(record.id)
                return False
            self._drop(record.id)
            self._make_room(record.owner, size)
            now = self._clock()
            self._kept[record.id] = _Kept(replace(record, size=size, expires=now + self._bounds.ttl, updated=now), list(kept_events))
            self._owned.setdefault(record.owner, OrderedDict())[record.id] = None
            self._owned_bytes[record.owner] = self._owned_bytes.get(record.owner, 0) + size
            self._bytes += size
            return True

    async def get(self, response_id: str) -> Record | None:
        with self._lock:
            self._expire()
            kept = self._kept.get(response_id)
            return kept.record if kept is not None else None

    async def delete(self, response_id: str) -> bool:
        with self._lock:
            there = response_id in self._kept
            self._drop(response_id)
            return there

    async def add_events(self, response_id: str, events: list[str], start: int) -> None:
        with self._lock:
            kept = self._kept.get(response_id)
            if kept is None:
                return
            del kept.events[start:]
            kept.events.extend(events)
            grown = sum(map(len, events))
            kept.record = replace(kept.record, size=kept.record.size + grown)
            self._bytes += grown
            self._owned_bytes[kept.record.owner] += grown

    async def events(self, response_id: str, start: int) -> list[str]:
        with self._lock:
            kept = self._kept.get(response_id)
            return kept.events[max(0, start):] if kept is not None else []

    async def close(self) -> None:
        return None
