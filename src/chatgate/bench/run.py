"""`chatgate bench`: the whole measurement in one run, so its ratios share the same conditions.

Targets are named: any number of OpenAI-compatible URLs (`--target chatgate=URL --target
vllm=URL`, or just `--url`, named `http`) and optionally the engine in this process (`raw`).
Each concurrency level runs every target in turn before the next level, so a change in the
machine's load during the run hits all targets alike instead of whichever ran last.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from chatgate.bench.answers import (
    answers_line,
    encode_replies,
    gate_line,
    reference_answers,
    runner_gates,
    score_answers,
    target_answers,
)
from chatgate.bench.baseline import hf_generate_tokens_per_s
from chatgate.bench.load import Target, engine_target, http_target, run_level
from chatgate.bench.report import chart, ratios, summarize, table
from chatgate.engines import create_engine
from chatgate.settings import BenchSettings

RAW = "raw"


def named_urls(settings: BenchSettings) -> dict[str, str]:
    """`--target NAME=URL` entries in order; `--url` as `http` when no target is named."""
    if not settings.target:
        return {"http": settings.url} if settings.http else {}
    return dict(entry.split("=", 1) for entry in settings.target)  # checked by the settings


@asynccontextmanager
async def _targets(settings: BenchSettings) -> AsyncIterator[dict[str, Target]]:
    urls = named_urls(settings)
    limits = httpx.Limits(max_connections=max(settings.concurrency) + 8)
    async with AsyncExitStack() as stack:
        targets: dict[str, Target] = {}
        if urls:
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits))
            for name, url in urls.items():
                targets[name] = http_target(http, url.rstrip("/"), settings.model, settings.api_key)
        if settings.raw:
            engine = create_engine(settings)
            await engine.start()
            stack.push_async_callback(engine.close)
            targets[RAW] = engine_target(engine)
        yield targets


async def _level(target: Target, settings: BenchSettings, concurrency: int, label: str) -> dict[str, Any]:
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
    return summarize(level)


async def _measure(settings: BenchSettings) -> dict[str, list[dict[str, Any]]]:
    async with _targets(settings) as targets:
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for concurrency in settings.concurrency:
            for name, target in targets.items():
                results[name].append(await _level(target, settings, concurrency, name))
        return results


async def _ask_targets(settings: BenchSettings) -> dict[str, list[str]]:
    """Every HTTP target's greedy replies to the quality prompts."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as http:
        replies = {}
        for name, url in named_urls(settings).items():
            print(f"answers: {name}", file=sys.stderr, flush=True)
            replies[name] = await target_answers(http, url.rstrip("/"), model=settings.model, api_key=settings.api_key)
        return replies


def _quality(settings: BenchSettings) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Each chatgate runner's gate, and every HTTP target's answers against float32's."""
    gates = _in_own_process(runner_gates, settings)
    replies = asyncio.run(_ask_targets(settings))
    reference = _in_own_process(reference_answers, settings)
    encoded = _in_own_process(encode_replies, settings, replies)
    return gates, {name: score_answers(reference, encoded[name], replies[name]) for name in replies}


def _in_own_process(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `function` in a fresh process: its model and thread pools must not slow the load runs."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *args, **kwargs).result()


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Measure what the settings ask for; write JSON and a PNG chart; return the report."""
    report: dict[str, Any] = {
        "model": settings.model,
        "max_tokens": settings.max_tokens,
        "requests_per_client": settings.requests_per_client,
        "ramp_up_s": settings.ramp_up,
        "urls": named_urls(settings),
        "raw_engine": {"dtype": settings.dtype, "num_threads": settings.num_threads} if settings.raw else None,
    }
    if settings.hf_baseline:
        print("baseline: Hugging Face generate, one sequence", file=sys.stderr, flush=True)
        report["hf_generate_tokens_per_s"] = _in_own_process(hf_generate_tokens_per_s, settings, max_tokens=settings.max_tokens)
    if settings.quality:
        report["quality_gates"], report["answers"] = _quality(settings)
    report["targets"] = asyncio.run(_measure(settings))
    report["ratios"] = ratios(report)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    report["chart"] = str(chart(report, out / "bench.png"))
    print(table(report), file=sys.stderr)
    for gate in report.get("quality_gates", []):
        print(gate_line(gate), file=sys.stderr)
    for name, scored in report.get("answers", {}).items():
        print(answers_line(name, scored), file=sys.stderr)
    print(json.dumps(report["ratios"], indent=2), file=sys.stderr)
    return report
