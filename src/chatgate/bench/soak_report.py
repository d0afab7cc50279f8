"""The soak's verdict from its records: outcomes by route, 5xx explained (or not) by a kill,
hung requests, latency and memory per minute, and a timeline chart."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatgate.bench.report import percentile
from chatgate.bench.traffic import Outcome

FAILURES = ("server_error", "transport_error")


@dataclass(frozen=True)
class Event:
    """A kill or restart the soak caused, at `at` seconds from the start."""

    at: float
    what: str  # "kill worker1", "restart controller", ...


@dataclass(frozen=True)
class Sample:
    """A process's resident memory at `at` seconds; `instance` tells restarts apart."""

    at: float
    process: str
    instance: int
    rss: int


def explained(outcome: Outcome, events: list[Event], grace: float) -> bool:
    """A failure is explained by a kill it overlapped (in flight then, or started just after)."""
    return any(outcome.start <= event.at + grace and outcome.end >= event.at for event in events)


def by_route(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """Counts of outcomes per kind of request."""
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outcomes:
        table[o.kind][o.outcome] += 1
    return {kind: dict(counts) for kind, counts in sorted(table.items())}


def latency_per_minute(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """p50/p95 of completed requests by the minute they started in."""
    minutes: dict[int, list[float]] = defaultdict(list)
    for o in outcomes:
        if o.outcome == "ok":
            minutes[int(o.start // 60)].append(o.end - o.start)
    return [
        {"minute": m, "requests": len(v), "p50_s": percentile(v, 50), "p95_s": percentile(v, 95)}
        for m, v in sorted(minutes.items())
    ]


def rss_per_minute(samples: list[Sample]) -> dict[str, list[dict[str, Any]]]:
    """Each process's last RSS sample (MiB) in each minute, with its instance number."""
    last: dict[tuple[str, int], Sample] = {}
    for s in samples:
        last[(s.process, int(s.at // 60))] = s
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (process, minute), s in sorted(last.items()):
        out[process].append({"minute": minute, "instance": s.instance, "rss_mib": round(s.rss / 2**20, 1)})
    return dict(out)


def rss_growth(samples: list[Sample], warmup: float) -> dict[str, float]:
    """Growth of each process instance from `warmup` seconds into its life to its last sample;
    instances that lived less than twice the warm-up are left out."""
    lives: dict[tuple[str, int], list[Sample]] = defaultdict(list)
    for s in samples:
        lives[(s.process, s.instance)].append(s)
    growth = {}
    for (process, instance), series in lives.items():
        born = series[0].at
        if series[-1].at - born < 2 * warmup:
            continue
        base = next(s for s in series if s.at - born >= warmup)
        growth[f"{process}#{instance}"] = (series[-1].rss - base.rss) / base.rss
    return growth


def verdict(
    outcomes: list[Outcome], events: list[Event], samples: list[Sample], *, grace: float, warmup: float, limit: float = 0.10
) -> dict[str, Any]:
    """Everything the soak reports, and whether it passed."""
    failures = [o for o in outcomes if o.outcome in FAILURES]
    unexplained = [o for o in failures if not explained(o, events, grace)]
    hung = [o for o in outcomes if o.outcome == "hung"]
    wrong = [o for o in outcomes if o.outcome == "client_error"]
    growth = rss_growth(samples, warmup)
    checks = {
        "no_unexplained_5xx": not unexplained,
        "no_hangs": not hung,
        "no_wrong_4xx": not wrong,
        "rss_growth_under_limit": all(g < limit for g in growth.values()),
    }
    return {
        "pass": all(checks.values()),
        "checks": checks,
        "requests": len(outcomes),
        "by_route": by_route(outcomes),
        "failures_explained_by_kills": len(failures) - len(unexplained),
        "unexplained_5xx": [o.as_dict() for o in unexplained],
        "hung": [o.as_dict() for o in hung],
        "wrong_4xx": [o.as_dict() for o in wrong[:20]],
        "latency_per_minute": latency_per_minute(outcomes),
        "rss_per_minute": rss_per_minute(samples),
        "rss_growth_after_warmup": growth,
        "events": [{"at_s": round(e.at, 2), "what": e.what} for e in events],
    }


def timeline(outcomes: list[Outcome], events: list[Event], samples: list[Sample], path: Path, bucket: float = 5.0) -> Path:
    """Throughput, errors and RSS over time, kills marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([o.end for o in outcomes] + [s.at for s in samples] + [bucket])
    edges = [i * bucket for i in range(int(end // bucket) + 1)]
    ok, failed = Counter[int](), Counter[int]()
    for o in outcomes:
        (ok if o.outcome in ("ok", "refused", "left") else failed)[int(o.end // bucket)] += 1
    figure, (rate, errors, memory) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    rate.plot(edges, [ok[i] / bucket for i in range(len(edges))], label="answered as expected")
    rate.set(ylabel="requests/s", title="chatgate soak")
    errors.bar(edges, [failed[i] for i in range(len(edges))], width=bucket * 0.9, align="edge", color="tab:red", label="5xx, hung, wrong")
    errors.set(ylabel=f"failures per {bucket:g}s")
    series: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        series[s.process].append(s)
    for process, points in sorted(series.items()):
        memory.plot([p.at for p in points], [p.rss / 2**20 for p in points], label=process)
    memory.set(ylabel="RSS (MiB)", xlabel="seconds")
    for axis in (rate, errors, memory):
        for event in events:
            axis.axvline(event.at, color="purple" if "controller" in event.what else "black", linestyle=":", alpha=0.7)
        axis.grid(alpha=0.3)
        axis.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
