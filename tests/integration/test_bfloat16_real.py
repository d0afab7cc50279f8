"""`--dtype bfloat16` served end to end: the default model's answers, streams, logprobs and
prompt scoring with bfloat16 products and float32 everything else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI

from chatgate.engines.base import Engine
from chatgate.engines.transformers import TransformersEngine
from chatgate.settings import EngineSettings
from tests.support.app import make_app, running, sdk, user

pytestmark = [pytest.mark.anyio, pytest.mark.model]

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["What is the capital of France?", "Give three tips for sleeping well.", "Write one sentence about the sea.",
           "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def bf16_engine() -> Engine:
    return TransformersEngine(EngineSettings(dtype="bfloat16"))


@pytest.fixture
async def bf16_app(bf16_engine: Engine) -> AsyncIterator[FastAPI]:
    async with running(make_app(bf16_engine)) as app:
        yield app


@pytest.fixture
async def float32_app(torch_engine: Engine) -> AsyncIterator[FastAPI]:
    """The reference: the default model in float32 on the same (torch) runner."""
    async with running(make_app(torch_engine)) as app:
        yield app


async def test_answers_alone_and_batched_and_streams_the_same_text(bf16_app: FastAPI) -> None:
    client = sdk(bf16_app)

    async def ask(prompt: str) -> str:
        reply = await client.chat.completions.create(model=MODEL, messages=user(prompt), temperature=0, max_tokens=24)
        return reply.choices[0].message.content or ""

    alone = [await ask(p) for p in PROMPTS]
    assert "Paris" in alone[0]
    # oneDNN blocks a product differently for different row counts, and bfloat16 rounding can
    # turn that into another token later on (float32 keeps batched text identical): so only the
    # answers are compared here, not whole texts.
    together = await asyncio.gather(*(ask(p) for p in PROMPTS))
    assert "Paris" in together[0]
    stream = await client.chat.completions.create(model=MODEL, messages=user(PROMPTS[2]), temperature=0, max_tokens=24, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == alone[2]


async def test_logprobs_are_close_to_float32s(bf16_app: FastAPI, float32_app: FastAPI) -> None:
    async def logprobs(app: FastAPI) -> list[tuple[str, float, float]]:
        reply = await sdk(app).chat.completions.create(
            model=MODEL, messages=user(PROMPTS[0]), temperature=0, max_tokens=8, logprobs=True, top_logprobs=3,
        )
        assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
        return [(t.token, t.logprob, t.top_logprobs[0].logprob) for t in reply.choices[0].logprobs.content]

    mine, reference = await logprobs(bf16_app), await logprobs(float32_app)
    assert [t for t, _, _ in mine] == [t for t, _, _ in reference]
    for (_, logprob, best), (_, exact, _) in zip(mine, reference, strict=True):
        assert logprob == best  # greedy: the chosen token is the most likely one
        assert abs(logprob - exact) < 0.1  # bfloat16 products move logprobs by ~0.01 on average


async def test_prompt_scoring_runs_in_float32(bf16_app: FastAPI, float32_app: FastAPI) -> None:
    async def echo(app: FastAPI) -> list[float]:
        reply = await sdk(app).completions.create(
            model=MODEL, prompt="The capital of France is Paris.", max_tokens=1, echo=True, logprobs=1, temperature=0
        )
        assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.token_logprobs is not None
        assert reply.usage is not None
        # The prompt's entries only: the generated token (if any: it may be the end of text,
        # which has no entry, and bfloat16 and float32 may pick differently) is not compared.
        return reply.choices[0].logprobs.token_logprobs[: reply.usage.prompt_tokens]

    assert await echo(bf16_app) == await echo(float32_app)  # the Hugging Face forward keeps float32 weights
