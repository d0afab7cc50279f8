"""How a worker is picked for a model: by the controller, and by API servers from their copy
of the worker table (the same functions, so both pick alike)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    """What dispatch needs to know about a worker."""

    @property
    def address(self) -> str: ...  # noqa: D102

    @property
    def speed(self) -> float: ...  # noqa: D102

    @property
    def queue_length(self) -> int: ...  # noqa: D102


W = TypeVar("W", bound=Candidate)


def lottery(workers: Sequence[W], rng: random.Random | None = None) -> W:
    """Pick at random, weighted by each worker's speed."""
    chooser = rng or random
    return chooser.choices(workers, weights=[max(w.speed, 1e-6) for w in workers], k=1)[0]


def shortest_queue(workers: Sequence[W], rng: random.Random | None = None) -> W:
    """Pick the worker with the least queue per unit of speed; ties at random."""
    chooser = rng or random
    load = {w.address: w.queue_length / max(w.speed, 1e-6) for w in workers}
    best = min(load.values())
    return chooser.choice([w for w in workers if load[w.address] == best])


METHODS: dict[str, Callable[..., Candidate]] = {"lottery": lottery, "shortest_queue": shortest_queue}
