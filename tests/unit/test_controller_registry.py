"""The controller's registry and dispatch, on an injected clock."""

from __future__ import annotations

import random
from collections import Counter

from chatgate.controller.dispatch import lottery, shortest_queue
from chatgate.controller.registry import Registry
from chatgate.protocol.worker import WorkerStatus


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stale_workers_expire_and_heartbeats_keep_them() -> None:
    clock = Clock()
    registry = Registry(expiration=10, clock=clock)
    registry.register("http://a", WorkerStatus(model_names=["m"]), check_heart_beat=True)
    registry.register("http://b", WorkerStatus(model_names=["m", "n"]), check_heart_beat=True)
    clock.now = 8
    assert registry.heartbeat("http://a", queue_length=2)
    clock.now = 12
    assert registry.expire() == ["http://b"]
    assert [w.address for w in registry.workers("m")] == ["http://a"]
    assert registry.models() == ["m"]
    assert not registry.heartbeat("http://b", queue_length=0)


def test_shortest_queue_prefers_idle_worker() -> None:
    registry = Registry(expiration=10, clock=Clock())
    registry.register("http://a", WorkerStatus(model_names=["m"], queue_length=5), check_heart_beat=True)
    registry.register("http://b", WorkerStatus(model_names=["m"], queue_length=1), check_heart_beat=True)
    assert shortest_queue(registry.workers("m")).address == "http://b"


def test_lottery_weights_by_speed() -> None:
    registry = Registry(expiration=10, clock=Clock())
    registry.register("http://a", WorkerStatus(model_names=["m"], speed=3), check_heart_beat=True)
    registry.register("http://b", WorkerStatus(model_names=["m"], speed=1), check_heart_beat=True)
    rng = random.Random(0)
    picks = Counter(lottery(registry.workers("m"), rng).address for _ in range(2000))
    assert 0.68 < picks["http://a"] / 2000 < 0.82


def test_a_full_registry_takes_no_new_worker_but_keeps_refreshing_known_ones() -> None:
    registry = Registry(expiration=10, clock=Clock(), max_workers=1)
    registry.register("http://a", WorkerStatus(model_names=["m"]), check_heart_beat=True)
    assert registry.has_room_for("http://a") and not registry.has_room_for("http://b")
