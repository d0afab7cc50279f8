"""The soak's bookkeeping: its fault schedule, which failures a kill explains, memory growth."""

from __future__ import annotations

from chatgate.bench.soak import schedule
from chatgate.bench.soak_report import Event, Sample, explained, rss_growth, verdict
from chatgate.bench.traffic import Outcome
from chatgate.settings import SoakSettings


def outcome(start: float, end: float, result: str = "server_error") -> Outcome:
    return Outcome(kind="chat", route="/v1/chat/completions", start=start, end=end, status=502, outcome=result)


def test_schedule_kills_workers_in_turn_and_the_controller_once_apart_from_them() -> None:
    plan = schedule(SoakSettings(minutes=10, kill_every=120))
    assert [name for _, name in plan if name != "controller"] == ["worker1", "worker2", "worker1", "worker2"]
    [(at, _)] = [p for p in plan if p[1] == "controller"]
    assert all(abs(at - t) >= 8 for t, name in plan if name != "controller") and 0 < at < 600


def test_a_failure_is_explained_only_by_a_kill_it_overlapped() -> None:
    kill = [Event(at=30.0, what="kill -9 worker1")]
    assert explained(outcome(29.0, 30.5), kill, grace=3)  # in flight at the kill
    assert explained(outcome(31.0, 31.2), kill, grace=3)  # just after it
    assert not explained(outcome(10.0, 12.0), kill, grace=3)
    assert not explained(outcome(40.0, 41.0), kill, grace=3)
    report = verdict([outcome(10.0, 12.0), outcome(29.0, 30.5)], kill, [], grace=3, warmup=20)
    assert not report["pass"] and report["failures_explained_by_kills"] == 1 and len(report["unexplained_5xx"]) == 1


def test_rss_growth_counts_from_the_warmup_of_each_process_instance() -> None:
    samples = [Sample(at=t, process="api", instance=1, rss=100 + (0 if t < 20 else t - 20)) for t in range(0, 60, 2)]
    samples += [Sample(at=t, process="worker1", instance=2, rss=500) for t in range(40, 60, 2)]  # too young
    growth = rss_growth(samples, warmup=20)
    assert set(growth) == {"api#1"} and abs(growth["api#1"] - 38 / 100) < 1e-9
    assert not verdict([], [], samples, grace=3, warmup=20)["checks"]["rss_growth_under_limit"]
