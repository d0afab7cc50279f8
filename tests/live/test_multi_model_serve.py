"""`chatgate serve --model default --model gemma3-270m` as a real process: both models served,
and a long prefill on Gemma does not stall a SmolLM2 stream (two engines, each with its own
scheduler thread and, on this 2-core machine, one llama.cpp thread)."""

from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatgate.engines.loading import DEFAULT_CHAT_NAME, GEMMA_NAME
from tests.support.app import sdk
from tests.support.processes import CHATGATE, Process, free_port

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")

pytestmark = [pytest.mark.live, pytest.mark.model]

TOKENS = 48


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    process = Process(
        ["serve", "--port", str(port), "--embedding-model-path", "none",
         "--model", "default engine=llama.cpp", "--model", "gemma3-270m engine=llama.cpp max-model-len=2048"],
        tmp_path_factory.mktemp("serve") / "serve.log",
    )
    try:
        process.wait_healthy(f"http://127.0.0.1:{port}", deadline=300)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


async def stream_gaps(url: str, model: str) -> list[float]:
    """Seconds between a greedy stream's chunks, after the first."""
    stream = await sdk(url).completions.create(
        model=model, prompt="Once upon a time", max_tokens=TOKENS, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    stamps = [time.perf_counter() async for _ in stream]
    assert len(stamps) >= TOKENS
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


@pytest.mark.anyio
async def test_both_models_answer_over_http(url: str) -> None:
    client = sdk(url)
    assert {m.id async for m in client.models.list()} == {DEFAULT_CHAT_NAME, GEMMA_NAME}
    for model in (DEFAULT_CHAT_NAME, GEMMA_NAME):
        reply = await client.completions.create(model=model, prompt="Water boils at", max_tokens=4, temperature=0)
        assert reply.model == model and reply.usage is not None and reply.usage.completion_tokens == 4


@pytest.mark.anyio
async def test_a_long_prefill_on_one_model_does_not_stall_the_others_stream(url: str) -> None:
    quiet = await stream_gaps(url, DEFAULT_CHAT_NAME)
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 170)  # ~1,900 Gemma tokens

    async def prefill() -> float:
        start = time.perf_counter()
        await sdk(url).completions.create(model=GEMMA_NAME, prompt=long_prompt, max_tokens=1)
        return time.perf_counter() - start

    prefilling = asyncio.create_task(prefill())
    await asyncio.sleep(0.2)  # Gemma's prefill is under way
    busy = await stream_gaps(url, DEFAULT_CHAT_NAME)
    prefill_seconds = await prefilling
    calm = statistics.median(quiet)
    print(f"SmolLM2 alone: median gap {calm * 1000:.1f} ms, longest {max(quiet) * 1000:.1f} ms; beside Gemma's "
          f"{prefill_seconds:.2f} s prefill: median {statistics.median(busy) * 1000:.1f} ms, longest {max(busy) * 1000:.1f} ms")
    # Had Gemma's prefill held SmolLM2's engine, one gap would last about the whole prefill. Two
    # engines on two shared cores (with the GIL between steps) may slow each token a few times.
    assert prefill_seconds > 1.0  # long enough that a stall would show
    assert max(busy) < min(prefill_seconds / 2, max(0.5, 10 * calm))
    assert statistics.median(busy) < 4 * calm + 0.02


@pytest.mark.parametrize(("engine", "says"), [
    ("llama.cpp", "llama.cpp could not load .*architecture 'nosucharch'"),
    ("transformers", "torch runner cannot load nosucharch.gguf: transformers does not read the GGUF architecture 'nosucharch'"),
])
def test_a_model_of_an_unknown_architecture_stops_serve_naming_it(tmp_path: Path, engine: str, says: str) -> None:
    from tests.support.gguf import gguf_of

    gguf = gguf_of(tmp_path, "nosucharch")
    done = subprocess.run(
        [*CHATGATE, "serve", "--port", str(free_port()), "--embedding-model-path", "none",
         "--model", "default", "--model", f"{gguf} engine={engine}"],
        capture_output=True, text=True, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0 and re.search(f"could not start: .*{says}", output), output[-2000:]
    assert "Traceback" not in output, output[-2000:]
