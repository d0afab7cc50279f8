"""The KV budget on the default model, through the SDK: the context reported is capped at what the
budget holds, a request beyond it gets a 400 at once, requests beyond the batch's room queue and
all complete, and requests that outgrow it together are preempted without changing an answer."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from chatgate.engines.base import Engine
from chatgate.settings import WorkerSettings
from chatgate.worker.app import create_worker_app
from tests.support.app import Messages, json_schema_format, make_app, running, sdk, user
from tests.support.polling import apoll
from tests.support.runners import RUNNERS, runner_engine, runner_of
from tests.support.structured import ASK, PERSON

pytestmark = [pytest.mark.anyio, pytest.mark.model]

MODEL = "SmolLM2-135M-Instruct"
# SmolLM2-135M keeps 45 KiB of float32 keys and values per token on the torch runner (0.01 GiB
# holds 233 tokens) and 22.5 KiB of float16 ones on llama.cpp (0.005 GiB holds 233).
BUDGET_GIB, BUDGET_TOKENS = {"torch": 0.01, "llama.cpp": 0.005}, 233


@pytest.mark.parametrize("runner", RUNNERS)
async def test_a_small_kv_budget_refuses_what_cannot_fit_and_queues_the_rest(runner: str) -> None:
    engine = runner_engine(runner, kv_cache_gib=BUDGET_GIB[runner])
    async with running(make_app(engine)) as app:
        client = sdk(app)
        assert engine.info.context_length == BUDGET_TOKENS
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=BUDGET_TOKENS)
        assert refused.value.code == "context_length_exceeded"
        assert f"maximum context length is {BUDGET_TOKENS} tokens" in refused.value.message
        # Each needs ~100 tokens of KV: two run at a time, the others wait their turn.
        answers = await asyncio.gather(*(
            client.chat.completions.create(model=MODEL, messages=user(f"Count to {i}."), max_tokens=60, temperature=0)
            for i in range(5)
        ))
        assert all(a.choices[0].message.content for a in answers)
        stats = engine.stats()
        assert stats is not None and stats.kv_cache_budget_tokens == BUDGET_TOKENS

        def released() -> bool:
            now = engine.stats()
            return now is not None and now.kv_cache_used_tokens == 0

        await apoll(released, what="the finished sequences' KV released", timeout=5)


# 0.012 GiB holds 279 tokens. A request without max_tokens may fill all of it, yet these start
# together, and give their KV back in turns once the two long answers (138 tokens each, 172 with
# the prompt) outgrow it side by side. Each answer ends by itself well before the limit (greedy),
# so the big budget gives the same answers.
# llama.cpp's rows are not padded to the longest, so the same answers fit in fewer tokens there:
# 0.0048 GiB holds 223 tokens of its float16 KV.
SMALL_GIB = {"torch": 0.012, "llama.cpp": 0.0048}
ASKS = [
    "Name three colours.",
    "Explain what a CPU does in three sentences.",
    "What is the capital of France?",
    "Name three colours.",
    "What is 2 + 2?",
    "Describe a cat in two sentences.",
]


async def streamed_answers(app: FastAPI, engine: Engine, seen_running: list[int]) -> list[str]:
    """Every ask (and one JSON-schema reply) streamed at once, greedy, without max_tokens; each
    chunk notes how many sequences the engine was running."""
    client = sdk(app)

    async def one(messages: Messages, **extra: Any) -> str:
        parts = []
        chunks = await client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stream=True, **extra)
        async for chunk in chunks:
            stats = engine.stats()
            seen_running.append(stats.running_sequences if stats else 0)
            parts += [c.delta.content or "" for c in chunk.choices]
        return "".join(parts)

    return await asyncio.gather(
        *(one(user(ask)) for ask in ASKS),
        one(ASK, response_format=json_schema_format("person", PERSON)),
    )


async def test_requests_without_max_tokens_run_together_under_a_small_budget_and_answer_as_with_a_big_one(
    chat_engine: Engine,
) -> None:
    roomy: list[int] = []
    async with running(make_app(chat_engine)) as app:
        expected = await streamed_answers(app, chat_engine, roomy)
    small = runner_engine(runner_of(chat_engine), kv_cache_gib=SMALL_GIB[runner_of(chat_engine)])
    tight: list[int] = []
    async with running(make_app(small)) as app:
        answers = await streamed_answers(app, small, tight)
        preemptions = await worker_metric(small, "chatgate_engine_preemptions_total")
    print(f"\nKV budget {small.info.context_length} tokens: up to {max(tight)} running at once (context "
          f"{small.info.context_length}), {preemptions:.0f} preemptions")
    if runner_of(chat_engine) == "torch":
        assert answers == expected
    else:  # llama.cpp's sums depend on how many tokens a pass holds: a recomputed answer may part later
        assert all(got[:16] == want[:16] for got, want in zip(answers, expected, strict=True)), (answers, expected)
    json.loads(answers[-1])
    assert max(tight) > 1 and preemptions > 0


async def worker_metric(engine: Engine, name: str) -> float:
    """`name`'s value on the /metrics of a worker serving `engine` (already started)."""
    worker = create_worker_app(WorkerSettings(no_register=True), engine=engine)
    async with running(worker), httpx.AsyncClient(transport=httpx.ASGITransport(app=worker), base_url="http://worker") as client:
        text = (await client.get("/metrics")).text
    found = re.search(rf'^{name}\{{model="[^"]+"\}} (\S+)$', text, re.M)
    assert found, text
    return float(found.group(1))
