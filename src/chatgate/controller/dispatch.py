"""How the controller picks a worker for a model."""

from __future__ import annotations

import random
from collections.abc import Callable

from chatgate.controller.registry import WorkerRecord

Dispatch = Callable[[list[WorkerRecord]], WorkerRecord]


def lottery(workers: list[WorkerRecord], rng: random.Random | None = None) -> WorkerRecord:
    """Pick at random, weighted by each worker's speed."""
    chooser = rng or random
    return chooser.choices(workers, weights=[max(w.speed, 1e-6) for w in workers], k=1)[0]


def shortest_queue(workers: list[WorkerRecord], rng: random.Random | None = None) -> WorkerRecord:
    """Pick the worker with the least queue per unit of speed; ties at random."""
    chooser = rng or random
    load = {w.address: w.queue_length / max(w.speed, 1e-6) for w in workers}
    best = min(load.values())
    return chooser.choice([w for w in workers if load[w.address] == best])


METHODS: dict[str, Dispatch] = {"lottery": lottery, "shortest_queue": shortest_queue}
