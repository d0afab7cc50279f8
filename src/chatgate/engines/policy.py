"""The scheduling policy: which waiting request runs first, and which running one gives way.

One definition for every engine that queues (the scheduler, and the fake engine's stand-in for
it). Under `fcfs` requests run in arrival order and `priority` plays no part (the worker refuses
a non-zero one, as vLLM does). Under `priority`, as in vLLM, a lower value runs first and ties go
by arrival; a waiting request that cannot start (the batch is full, or its KV does not fit) takes
the place of a running one it strictly outranks, the lowest-ranked and, among equals, the most
recently admitted, which waits again to resume where it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from chatgate.settings import SchedulingPolicy


class Queued(Protocol):
    """What the policy reads of a request."""

    @property
    def priority(self) -> int:
        """Lower runs first (under the priority policy)."""

    @property
    def arrival(self) -> int:
        """A rising count: when the request arrived."""

    @property
    def admitted(self) -> int:
        """A rising count: when it was last admitted; 0 while it waits."""


T = TypeVar("T", bound=Queued)


@dataclass(frozen=True)
class Policy:
    """Orders the waiting and picks who gives way, under one of the policies."""

    name: SchedulingPolicy = "fcfs"

    @property
    def by_priority(self) -> bool:
        """Whether requests' priorities count."""
        return self.name == "priority"

    def order(self, waiting: list[T]) -> list[T]:
        """`waiting` in the order it is served. Under priority: requests already admitted (part-way
        through a prefill) first, then by priority and arrival; under fcfs, as it stands."""
        if not self.by_priority:
            return waiting
        return sorted(waiting, key=lambda r: (not r.admitted, r.priority, r.arrival))

    def victim(self, running: Iterable[T], *, outranked_by: int) -> T | None:
        """The running request that gives way to a waiting one of priority `outranked_by`, if
        any: under priority, the lowest-ranked one it strictly outranks, the most recently
        admitted among equals; under fcfs, none."""
        if not self.by_priority:
            return None
        lower = [r for r in running if r.priority > outranked_by]
        return max(lower, key=lambda r: (r.priority, r.admitted)) if lower else None

    def first_to_go(self, admitted: Iterable[T]) -> T:
        """The admitted request a shortage of KV takes back first: the most recently admitted,
        under priority the lowest-ranked first."""
        if self.by_priority:
            return max(admitted, key=lambda r: (r.priority, r.admitted))
        return max(admitted, key=lambda r: r.admitted)
