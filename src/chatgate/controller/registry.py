"""The controller's worker registry: who serves what, how busy, and whether still alive."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from chatgate.protocol.worker import WorkerEntry, WorkerStatus

Clock = Callable[[], float]


@dataclass
class WorkerRecord:
    """What the controller knows about one worker."""

    address: str
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heartbeat: float

    def entry(self) -> WorkerEntry:
        """This worker as a row of the public worker table."""
        return WorkerEntry(
            address=self.address,
            model_names=self.model_names,
            speed=self.speed,
            queue_length=self.queue_length,
        )


class Registry:
    """All registered workers; time comes from an injectable clock."""

    def __init__(
        self, *, expiration: float, clock: Clock = time.monotonic, max_workers: int = 1024
    ) -> None:
        self._expiration = expiration
        self._clock = clock
        self._max_workers = max_workers
        self._workers: dict[str, WorkerRecord] = {}

    def has_room_for(self, address: str) -> bool:
        """Whether `address` may register: it is known already, or the registry is not full."""
        return address in self._workers or len(self._workers) < self._max_workers

    def register(self, address: str, status: WorkerStatus, *, check_heart_beat: bool) -> None:
        """Add or replace a worker."""
        self._workers[address] = WorkerRecord(
            address=address,
            model_names=list(status.model_names),
            speed=status.speed,
            queue_length=status.queue_length,
            check_heart_beat=check_heart_beat,
            last_heartbeat=self._clock(),
        )

    def heartbeat(self, address: str, queue_length: int) -> bool:
        """Record a heartbeat; False if the worker is unknown (it should register again)."""
        record = self._workers.get(address)
        if record is None:
            return False
        record.queue_length = queue_length
        record.last_heartbeat = self._clock()
        return True

    def remove(self, address: str) -> None:
        """Forget a worker."""
        self._workers.pop(address, None)

    def expire(self) -> list[str]:
        """Drop workers whose heartbeat is overdue; return their addresses."""
        deadline = self._clock() - self._expiration
        stale = [
            a for a, r in self._workers.items() if r.check_heart_beat and r.last_heartbeat < deadline
        ]
        for address in stale:
            del self._workers[address]
        return stale

    def workers(self, model: str | None = None) -> list[WorkerRecord]:
        """Live workers, optionally only those serving `model`."""
        return [r for r in self._workers.values() if model is None or model in r.model_names]

    def models(self) -> list[str]:
        """Every model name some worker serves."""
        return sorted({name for r in self._workers.values() for name in r.model_names})
