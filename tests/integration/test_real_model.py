"""The default model, served in-process and driven through the official openai SDK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import pytest
from fastapi import FastAPI

from chatgate.engines.base import SamplingParams
from chatgate.engines.transformers import TransformersEngine
from chatgate.settings import EngineSettings
from tests.conftest import Messages, as_dicts, make_app, running, sdk, user
from tests.polling import apoll

pytestmark = [pytest.mark.anyio, pytest.mark.model]

MODEL = "SmolLM2-135M-Instruct"
PARIS: Messages = [{"role": "user", "content": "What is the capital of France?"}]


async def test_answers_paris_with_exact_usage(chat_app: FastAPI, chat_engine: TransformersEngine) -> None:
    response = await sdk(chat_app).chat.completions.create(model=MODEL, messages=PARIS, temperature=0)
    assert "Paris" in (response.choices[0].message.content or "")
    assert response.choices[0].finish_reason == "stop"
    templated = chat_engine._tokenizer.apply_chat_template(as_dicts(PARIS), add_generation_prompt=True, tokenize=True)
    ids = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(ids)
    text = response.choices[0].message.content or ""
    # The completion is the answer's tokens plus the end-of-turn token.
    assert response.usage.completion_tokens == len(chat_engine.encode(text, add_special_tokens=False)) + 1


async def test_stream_matches_non_stream_exactly(chat_app: FastAPI) -> None:
    client = sdk(chat_app)
    messages = user("Write one sentence about the sea.")
    whole = await client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage == whole.usage


async def test_stop_spanning_two_tokens(chat_app: FastAPI, chat_engine: TransformersEngine) -> None:
    client = sdk(chat_app)
    answer = "The capital of France is Paris."
    tokens = [chat_engine.decode([t]) for t in chat_engine.encode(answer, add_special_tokens=False)]
    assert "is" in tokens[-3] and "Paris" in tokens[-2]  # " is" and " Paris" are separate tokens
    for stream in (False, True):
        if stream:
            s = await client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, stop=["s Pa"], stream=True)
            chunks = [c async for c in s]
            text: str | None = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            r = await client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, stop=["s Pa"])
            text, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
        assert text == "The capital of France i"
        assert finish == ["stop"]


async def test_completions_list_n_echo_length(chat_app: FastAPI) -> None:
    client = sdk(chat_app)
    prompts = ["Once upon a time", "The weather today"]
    response = await client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, n=2, echo=True, temperature=0)
    assert len(response.choices) == 4
    for choice in response.choices:
        assert choice.text.startswith(prompts[choice.index // 2])
        assert choice.finish_reason == "length"
    assert response.choices[0].text == response.choices[1].text  # greedy: both choices agree
    assert response.usage is not None and response.usage.completion_tokens == 4 * 8
    stream = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)
    streamed = "".join([c.choices[0].text async for c in stream if c.choices])
    assert "Once upon a time" + streamed == response.choices[0].text


async def test_seed_reproduces_sampled_text(chat_app: FastAPI) -> None:
    client = sdk(chat_app)
    first, second = [
        await client.completions.create(model=MODEL, prompt="My favourite food is", max_tokens=12, temperature=1.0, seed=1234)
        for _ in range(2)
    ]
    assert first.choices[0].text == second.choices[0].text


async def test_closing_a_stream_frees_its_slot(chat_engine: TransformersEngine) -> None:
    await chat_engine.start()
    try:
        stream = chat_engine.generate(chat_engine.encode("Count to one hundred:"), SamplingParams(max_tokens=500, temperature=0))
        assert isinstance(stream, AsyncGenerator)  # Engine.generate promises an iterator; this one is a generator
        seen = [await anext(stream) for _ in range(2)]
        assert seen[0].completion_tokens >= 1
        await stream.aclose()
        await apoll(lambda: chat_engine.pending() == 0, what="the closed stream's slot freed", timeout=5)
    finally:
        await chat_engine.close()


PROMPTS = [
    "What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
    "Why is the sky blue?", "What is 12 times 7?", "Describe a cat in one sentence.",
    "Give me a tip for learning Python.", "What do bees make?",
]


async def _greedy(chat_engine: TransformersEngine, text: str, max_tokens: int = 32, temperature: float = 0.0,
                  seed: int | None = None) -> list[int]:
    ids = chat_engine.encode(chat_engine.render_chat([{"role": "user", "content": text}]), add_special_tokens=False)
    tokens: list[int] = []
    async for out in chat_engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)):
        tokens += out.token_ids
    return tokens


async def test_greedy_tokens_are_the_same_alone_and_among_15_others(chat_engine: TransformersEngine) -> None:
    await chat_engine.start()
    try:
        alone = [await _greedy(chat_engine, p) for p in PROMPTS[:4]]
        seeded_alone = await _greedy(chat_engine, PROMPTS[5], temperature=1.0, seed=7)
        long_prompt = "Summarise this text. " + " ".join(f"Sentence {i} talks about the weather." for i in range(60))
        fillers = [_greedy(chat_engine, f"Tell me about the number {i}.", max_tokens=24 + i) for i in range(10)]
        crowd = await asyncio.gather(
            *(_greedy(chat_engine, p) for p in PROMPTS[:4]),
            _greedy(chat_engine, PROMPTS[5], temperature=1.0, seed=7),
            _greedy(chat_engine, long_prompt, max_tokens=16),  # chunked prefill joins mid-flight
            *fillers,
        )
        assert crowd[:4] == alone
        assert crowd[4] == seeded_alone
        assert all(len(tokens) > 0 for tokens in crowd)
    finally:
        await chat_engine.close()


async def test_n_choices_share_one_prefill(chat_app: FastAPI, chat_engine: TransformersEngine) -> None:
    assert chat_engine._scheduler is not None
    before = chat_engine._scheduler.prefill_tokens
    response = await sdk(chat_app).chat.completions.create(model=MODEL, messages=PARIS, n=4, temperature=0, max_tokens=8)
    assert len({c.message.content for c in response.choices}) == 1
    assert response.usage is not None
    assert chat_engine._scheduler.prefill_tokens - before == response.usage.prompt_tokens
