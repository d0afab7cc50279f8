"""What an API server caches per (worker, model) is forgotten when the worker leaves the table or
stops serving that model: adapter names come and go, and the cache must not grow with them."""

from __future__ import annotations

from chatgate.api.workers.http import WorkerFacts
from chatgate.protocol import worker as wire


def _details() -> wire.ModelDetails:
    return wire.ModelDetails(context_length=2048)


def test_models_a_worker_no_longer_serves_are_forgotten() -> None:
    facts = WorkerFacts()
    for key in [("http://w1", "base"), ("http://w1", "adapter-1"), ("http://w2", "base")]:
        facts.details[key] = _details()
    facts.in_flight["http://w2"] = 0
    facts.in_flight["http://w1"] = 1
    facts.forget(keep={("http://w1", "base")})
    assert set(facts.details) == {("http://w1", "base")}
    assert set(facts.in_flight) == {"http://w1"}  # w2 left; w1 still serves a request


def test_dropping_one_worker_forgets_all_its_models_only() -> None:
    facts = WorkerFacts()
    for key in [("http://w1", "base"), ("http://w1", "adapter-1"), ("http://w2", "base")]:
        facts.details[key] = _details()
    facts.forget(drop="http://w1")
    assert set(facts.details) == {("http://w2", "base")}
