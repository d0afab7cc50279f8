"""`chatgate bench`: the whole measurement in one run, so its ratios share the same conditions."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Any

import httpx

from chatgate.bench.baseline import hf_generate_tokens_per_s
from chatgate.bench.load import Target, engine_target, http_target, run_level
from chatgate.bench.report import chart, ratios, summarize, table
from chatgate.engines import create_engine
from chatgate.settings import BenchSettings


async def _levels(target: Target, settings: BenchSettings, label: str) -> list[dict[str, Any]]:
    results = []
    for concurrency in settings.concurrency:
        print(f"{label}: {concurrency} concurrent stream(s)", file=sys.stderr, flush=True)
        # One short request first, so the level measures a warm path.
        await run_level(target, concurrency=1, requests_per_client=1, max_tokens=4, label="warm-up")
        level = await run_level(
            target,
            concurrency=concurrency,
            requests_per_client=settings.requests_per_client,
            max_tokens=settings.max_tokens,
            label=label,
            ramp_up=settings.ramp_up,
        )
        results.append(summarize(level))
    return results


async def _raw(settings: BenchSettings) -> list[dict[str, Any]]:
    engine = create_engine(settings)
    await engine.start()
    try:
        return await _levels(engine_target(engine), settings, "raw")
    finally:
        await engine.close()


async def _http(settings: BenchSettings) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=max(settings.concurrency) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        target = http_target(http, settings.url.rstrip("/"), settings.model, settings.api_key)
        return await _levels(target, settings, "http")


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Measure what the settings ask for; write JSON and a PNG chart; return the report."""
    report: dict[str, Any] = {
        "model": settings.model,
        "max_tokens": settings.max_tokens,
        "requests_per_client": settings.requests_per_client,
        "ramp_up_s": settings.ramp_up,
        "url": settings.url if settings.http else None,
    }
    if settings.hf_baseline:
        print("baseline: Hugging Face generate, one sequence", file=sys.stderr, flush=True)
        # In a process of its own: a second model and its thread pools would slow the raw run.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            baseline = pool.submit(hf_generate_tokens_per_s, settings, max_tokens=settings.max_tokens)
            report["hf_generate_tokens_per_s"] = baseline.result()
    if settings.raw:
        report["raw"] = asyncio.run(_raw(settings))
    if settings.http:
        report["http"] = asyncio.run(_http(settings))
    report["ratios"] = ratios(report)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    report["chart"] = str(chart(report, out / "bench.png"))
    print(table(report), file=sys.stderr)
    print(json.dumps(report["ratios"], indent=2), file=sys.stderr)
    return report
