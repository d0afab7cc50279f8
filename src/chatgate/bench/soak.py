"""`chatgate soak`: a fleet under mixed traffic for minutes, with a worker killed (-9) and
restarted every `--kill-every` seconds and the controller killed and restarted once.

It writes `soak.json` (requests by route and outcome, failures a kill does not explain, hung
requests, p50/p95 per minute, RSS per process per minute) and `soak.png` (a timeline), and
passes when nothing failed unexplained, nothing hung, and no process grew by 10% or more
after its first minute.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chatgate.bench.fleet import Fleet
from chatgate.bench.soak_report import Event, Sample, timeline, verdict
from chatgate.bench.traffic import Outcome, clients
from chatgate.settings import SoakSettings


def schedule(settings: SoakSettings) -> list[tuple[float, str]]:
    """When which process is killed and restarted: workers in turn, the controller once."""
    duration = settings.minutes * 60
    plan, turn, at = [], 0, settings.kill_every
    while at < duration - 5:
        plan.append((at, f"worker{turn % 2 + 1}"))
        turn, at = turn + 1, at + settings.kill_every
    controller_at = settings.controller_restart_at if settings.controller_restart_at is not None else duration / 2
    if any(abs(controller_at - t) < 8 for t, _ in plan):  # keep the two kinds of fault apart
        controller_at += min(settings.kill_every / 2, 15)
    plan.append((controller_at, "controller"))
    return sorted(plan)


async def _chaos(fleet: Fleet, plan: list[tuple[float, str]], events: list[Event], t0: float, until: float) -> None:
    """Workers are killed one at a time (a kill waits for the previous restart, as a worker
    can be slow to start, so the model always keeps a worker); the controller on its own."""
    workers = [(at, name) for at, name in plan if name != "controller"]
    controller = [(at, name) for at, name in plan if name == "controller"]
    await asyncio.gather(_faults(fleet, workers, events, t0, until), _faults(fleet, controller, events, t0, until))


async def _faults(fleet: Fleet, plan: list[tuple[float, str]], events: list[Event], t0: float, until: float) -> None:
    # What would land in the last seconds of the run is skipped.
    for at, name in plan:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        if time.monotonic() > until - 5:
            return
        member = fleet.members[name]
        member.kill()
        events.append(Event(at=time.monotonic() - t0, what=f"kill -9 {name}"))
        await member.start()
        events.append(Event(at=time.monotonic() - t0, what=f"{name} restarted"))


async def _sample(fleet: Fleet, samples: list[Sample], t0: float, until: float, every: float = 2.0) -> None:
    while time.monotonic() < until:
        for name, member in fleet.members.items():
            rss = member.rss()
            if rss is not None:
                samples.append(Sample(at=time.monotonic() - t0, process=name, instance=member.generation, rss=rss))
        await asyncio.sleep(every)


async def soak(settings: SoakSettings, logs: Path) -> dict[str, Any]:
    """Run the soak and return its report."""
    fleet = Fleet(logs, token_delay=settings.token_delay)
    outcomes: list[Outcome] = []
    events: list[Event] = []
    samples: list[Sample] = []
    try:
        await fleet.start()
        t0 = time.monotonic()
        until = t0 + settings.minutes * 60
        await asyncio.gather(
            clients(fleet.api.url, outcomes, count=settings.clients, until=until, deadline=settings.request_timeout, t0=t0),
            _chaos(fleet, schedule(settings), events, t0, until),
            _sample(fleet, samples, t0, until),
        )
    finally:
        fleet.stop()
    # Only the kills explain failures: a restart that is under way explains nothing more.
    kills = [e for e in events if e.what.startswith("kill")]
    warmup = min(60.0, settings.minutes * 60 / 3)
    report = verdict(outcomes, kills, samples, grace=settings.grace, warmup=warmup)
    report["settings"] = settings.model_dump(mode="json")
    report["events"] = [{"at_s": round(e.at, 2), "what": e.what} for e in events]
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "soak.json").write_text(json.dumps(report, indent=2))
    timeline(outcomes, events, samples, output / "soak.png")
    return report


def run_soak(settings: SoakSettings) -> None:
    """Run the soak, print the verdict, and exit 1 if it failed."""
    with tempfile.TemporaryDirectory(prefix="chatgate-soak-") as logs:
        report = asyncio.run(soak(settings, Path(logs)))
    summary = {k: report[k] for k in ("pass", "checks", "requests", "failures_explained_by_kills", "rss_growth_after_warmup")}
    print(json.dumps(summary, indent=2))
    print(f"report: {settings.output_dir}/soak.json, timeline: {settings.output_dir}/soak.png", file=sys.stderr)
    if not report["pass"]:
        raise SystemExit(1)
