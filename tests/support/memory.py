"""A memory reader tests set by hand (`engines/memory.py`'s `MemoryReader`)."""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30


@dataclass
class SetMemory:
    """Says `available` bytes are free on every device; a test changes it while serving."""

    available_bytes: int
    asked: list[str] = field(default_factory=list)  # the devices asked about, in order

    def available(self, device: str) -> int | None:
        """The bytes the test set."""
        self.asked.append(device)
        return self.available_bytes
