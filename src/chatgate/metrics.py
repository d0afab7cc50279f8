"""Prometheus metrics of every chatgate process, each in a registry of its own (no globals).

`chatgate serve` puts the API server's and the worker's metrics in one registry; the separate
processes each expose theirs on `/metrics` (`chatgate.ops`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from chatgate.engines.base import EngineStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)


class ApiMetrics:
    """What the API server counts: requests, latencies and tokens."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "chatgate_requests", "Requests by route, model and HTTP status.",
            ["route", "model", "status"], registry=registry,
        )
        self.latency = Histogram(
            "chatgate_request_duration_seconds", "Request time until the last byte.",
            ["route", "model"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.ttft = Histogram(
            "chatgate_time_to_first_token_seconds", "Time to the first generated text.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.itl = Histogram(
            "chatgate_inter_token_latency_seconds", "Time between pieces of streamed text.",
            ["model"], buckets=_TOKEN_BUCKETS, registry=registry,
        )
        self.prompt_tokens = Counter(
            "chatgate_prompt_tokens", "Prompt tokens processed.", ["model"], registry=registry
        )
        self.completion_tokens = Counter(
            "chatgate_completion_tokens", "Completion tokens generated.", ["model"], registry=registry
        )


class FleetCollector(Collector):
    """Values read at scrape time: workers per model; queue, running and served per worker."""

    def __init__(
        self,
        *,
        workers_per_model: Callable[[], dict[str, int]],
        worker_load: Callable[[], Iterable[tuple[str, int, int]]],
        served: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self._workers_per_model = workers_per_model
        self._worker_load = worker_load
        self._served = served

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        workers = GaugeMetricFamily("chatgate_workers", "Healthy workers per model.", labels=["model"])
        for model, count in sorted(self._workers_per_model().items()):
            workers.add_metric([model], count)
        queue = GaugeMetricFamily("chatgate_worker_queue_length", "Requests queued or running per worker.", labels=["worker"])
        running = GaugeMetricFamily("chatgate_worker_running_sequences", "Sequences in the running batch per worker.", labels=["worker"])
        waiting = GaugeMetricFamily("chatgate_worker_waiting_requests", "Requests a worker holds but does not run yet "
                                    "(what to scale workers on).", labels=["worker"])
        for worker, queued, active in self._worker_load():
            queue.add_metric([worker], queued)
            running.add_metric([worker], active)
            waiting.add_metric([worker], max(0, queued - active))
        yield workers
        yield queue
        yield running
        yield waiting
        if self._served is not None:
            served = CounterMetricFamily("chatgate_worker_requests", "Generation and embedding requests a worker took.", labels=["model"])
            for model, count in sorted(self._served().items()):
                served.add_metric([model], count)
            yield served



# Each `EngineStats` field on /metrics: its name, whether it only grows, and what it counts.
_ENGINE_METRICS: list[tuple[str, str, type[CounterMetricFamily] | type[GaugeMetricFamily], str]] = [
    ("prefill_tokens", "chatgate_engine_prefill_tokens", CounterMetricFamily, "Prompt tokens run through the model."),
    ("prefix_cache_hits", "chatgate_prefix_cache_hits", CounterMetricFamily, "Prompts that started from cached KV of an earlier prompt."),
    ("prefix_cache_reused_tokens", "chatgate_prefix_cache_reused_tokens", CounterMetricFamily,
     "Prompt tokens copied from the prefix cache instead of prefilled."),
    ("prefix_cache_bytes", "chatgate_prefix_cache_bytes", GaugeMetricFamily, "Memory the prefix cache holds."),
    ("kv_cache_budget_tokens", "chatgate_kv_cache_budget_tokens", GaugeMetricFamily, "KV tokens the running batch may hold."),
    ("kv_cache_used_tokens", "chatgate_kv_cache_used_tokens", GaugeMetricFamily, "KV tokens the admitted sequences hold."),
    ("preemptions", "chatgate_engine_preemptions", CounterMetricFamily,
     "Sequences that gave their KV back to the budget, to be prefilled again."),
    ("running_sequences", "chatgate_engine_running_sequences", GaugeMetricFamily, "Sequences in the engine's running batch."),
]


class EngineCollector(Collector):
    """An engine's own counters, read at scrape time: prefill work, what prefix caching saved, KV held."""

    def __init__(self, stats: Callable[[], Iterable[tuple[str, EngineStats]]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        families = [(field, kind(name, text, labels=["model"])) for field, name, kind, text in _ENGINE_METRICS]
        for model, stats in self._stats():
            for field, family in families:
                family.add_metric([model], getattr(stats, field))
        yield from (family for _, family in families)
