"""Closed-loop streaming load: C clients, each sending its next request when the last ends.

The same loop drives two kinds of target: any OpenAI-compatible URL over HTTP (chatgate or a
peer), and an engine in this process with no HTTP at all (the ceiling the server is measured
against). Every request records when it started, when each piece of text arrived and when it
ended; `report.py` turns those into latencies and throughput.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

from chatgate.engines.base import Engine, SamplingParams
from chatgate.tasks import cancel_and_wait

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe, in detail, a journey across a desert on a camel.",
    "Tell a long tale about a dragon who wants to become a baker.",
    "Write a detailed account of a day in the life of a medieval blacksmith.",
    "Explain at length how a city changes over the four seasons.",
    "Write a long adventure story about explorers discovering a hidden valley.",
    "Tell a story about a robot learning to paint, with many details.",
    "Describe a long voyage on a sailing ship through a storm.",
]


@dataclass
class RequestRecord:
    """Timings of one request, in seconds from its start."""

    ttft: float | None = None
    arrivals: list[float] = field(default_factory=list)
    e2e: float = 0.0
    tokens: int = 0
    error: str | None = None


Target = Callable[[str, int], AsyncIterator[int]]
"""Streams one request for (prompt, max_tokens); yields the tokens each piece carries (0 at the
end if only the final usage says how many there were)."""


def http_target(http: httpx.AsyncClient, url: str, model: str, api_key: str) -> Target:
    """A target that streams chat completions from an OpenAI-compatible server."""

    async def stream(prompt: str, max_tokens: int) -> AsyncIterator[int]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Authorization": f"Bearer {api_key}"}
        async with http.stream("POST", f"{url}/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"].get("message", "stream error"))
                if event.get("usage"):
                    yield -int(event["usage"]["completion_tokens"])  # the exact total, at the end
                elif event["choices"] and event["choices"][0]["delta"].get("content"):
                    yield 1

    return stream


def engine_target(engine: Engine) -> Target:
    """A target that drives an engine in this process: no HTTP, no serialisation."""

    async def stream(prompt: str, max_tokens: int) -> AsyncIterator[int]:
        ids = engine.encode(engine.render_chat([{"role": "user", "content": prompt}]), add_special_tokens=False)
        async for output in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0)):
            if output.text or output.finish_reason:
                yield len(output.token_ids)

    return stream


async def one_request(target: Target, prompt: str, max_tokens: int, record: RequestRecord | None = None) -> RequestRecord:
    """Run one request and time it, filling `record` as it goes."""
    record = record if record is not None else RequestRecord()
    start = time.perf_counter()
    exact: int | None = None
    try:
        async for count in target(prompt, max_tokens):
            now = time.perf_counter() - start
            if count < 0:
                exact = -count
                continue
            if record.ttft is None:
                record.ttft = now
            record.arrivals.append(now)
            record.tokens += count
    except Exception as exc:  # a failed request is counted, not fatal to the run
        record.error = str(exc)[:200] or type(exc).__name__
    record.e2e = time.perf_counter() - start
    if exact is not None:
        record.tokens = exact
    return record


@dataclass
class LevelResult:
    """All requests of one concurrency level and the wall time they took."""

    concurrency: int
    records: list[RequestRecord]
    wall: float


async def run_level(
    target: Target,
    *,
    concurrency: int,
    requests_per_client: int,
    max_tokens: int,
    label: str,
    ramp_up: float = 0.0,
) -> LevelResult:
    """`concurrency` closed-loop clients, each sending `requests_per_client` requests.

    Client i starts `i * ramp_up / concurrency` seconds in. Closed-loop clients whose requests
    take equally long stay in step with each other, so without a ramp every round arrives as
    one burst; with it, arrivals stay spread as real users' are.
    """
    records: list[RequestRecord] = []  # started requests, in-flight ones included
    done: list[RequestRecord] = []
    total = concurrency * requests_per_client
    start = time.perf_counter()

    async def client(index: int) -> None:
        await asyncio.sleep(index * ramp_up / concurrency)
        for turn in range(requests_per_client):
            prompt = PROMPTS[(index + turn * concurrency) % len(PROMPTS)]
            record = RequestRecord()
            records.append(record)
            await one_request(target, prompt, max_tokens, record)
            done.append(record)

    def show() -> None:
        elapsed = time.perf_counter() - start
        tokens = sum(r.tokens for r in records)
        print(f"  [{label} c={concurrency}] {len(done)}/{total} requests, {elapsed:.0f}s, "
              f"{tokens / max(elapsed, 1e-9):.1f} tok/s so far", file=sys.stderr, flush=True)

    async def progress() -> None:
        while True:
            await asyncio.sleep(2.0)
            show()

    reporter = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(client(i) for i in range(concurrency)))
    finally:
        await cancel_and_wait(reporter)
    show()
    return LevelResult(concurrency=concurrency, records=records, wall=time.perf_counter() - start)
