"""The default model driven through the official openai SDK: the API checks run over each engine
(`served`: transformers in-process, vllm as a live fleet); the rest test the transformers engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import openai
import pytest
from fastapi import FastAPI

from chatgate.engines.base import SamplingParams
from chatgate.engines.transformers import TransformersEngine
from chatgate.settings import EngineSettings
from tests.support.app import Messages, Target, as_dicts, make_app, raw, running, sdk, user
from tests.support.asgi import call
from tests.support.polling import apoll
from tests.support.runners import Served

pytestmark = [pytest.mark.anyio, pytest.mark.model]

MODEL = "SmolLM2-135M-Instruct"
PARIS: Messages = [{"role": "user", "content": "What is the capital of France?"}]


async def test_answers_paris_with_exact_usage(served: Served, tokenizer: Any) -> None:
    # A cache salt reaches each engine's prefix cache (vLLM takes it in the prompt) and changes no answer.
    response = await sdk(served.api).chat.completions.create(
        model=MODEL, messages=PARIS, temperature=0, extra_body={"cache_salt": "tenant-a"},
    )
    assert "Paris" in (response.choices[0].message.content or "")
    assert response.choices[0].finish_reason == "stop"
    templated = tokenizer.apply_chat_template(as_dicts(PARIS), add_generation_prompt=True, tokenize=True)
    ids = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(ids)  # the model's own template
    text = response.choices[0].message.content or ""
    # The completion is the answer's tokens plus the end-of-turn token.
    assert response.usage.completion_tokens == len(tokenizer.encode(text, add_special_tokens=False)) + 1


async def test_stream_matches_non_stream_exactly(served: Served) -> None:
    client = sdk(served.api)
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
    streamed = chunks[-1].usage
    assert streamed is not None and whole.usage is not None
    details = {"prompt_tokens_details"}  # the second request finds the first's prompt cached
    assert streamed.model_dump(exclude=details) == whole.usage.model_dump(exclude=details)
    assert streamed.prompt_tokens_details is not None and whole.usage.prompt_tokens_details is not None
    assert (streamed.prompt_tokens_details.cached_tokens or 0) >= (whole.usage.prompt_tokens_details.cached_tokens or 0)


async def test_stop_spanning_two_tokens(served: Served, tokenizer: Any) -> None:
    client = sdk(served.api)
    answer = "The capital of France is Paris."
    tokens = [tokenizer.decode([t]) for t in tokenizer.encode(answer, add_special_tokens=False)]
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


async def test_completions_list_n_echo_length(served: Served) -> None:
    client = sdk(served.api)
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


async def test_seed_reproduces_sampled_text(served: Served) -> None:
    client = sdk(served.api)
    first, second, other = [
        await client.completions.create(model=MODEL, prompt="My favourite food is", max_tokens=12, temperature=1.0, seed=seed)
        for seed in (1234, 1234, 99)
    ]
    assert first.choices[0].text == second.choices[0].text
    assert other.choices[0].text != first.choices[0].text  # the seed, not greedy decoding, fixed it


async def _tokens(served: Served, prompt: str, **extra: Any) -> list[str]:
    """The greedy completion's tokens, as its log-probabilities name them."""
    response = await sdk(served.api).completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                        logprobs=1, **extra)
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    return list(logprobs.tokens)


async def test_logit_bias_bans_the_greedy_token(served: Served, tokenizer: Any) -> None:
    prompt = "The capital of France is"
    free = await _tokens(served, prompt)
    banned = tokenizer.encode(free[0], add_special_tokens=False)
    assert len(banned) == 1, free  # the first token's text round-trips to its id
    biased = await _tokens(served, prompt, logit_bias={str(banned[0]): -100})
    assert biased[0] != free[0] and free[0] not in biased


async def test_penalties_cut_repetition(served: Served) -> None:
    prompt = "Repeat after me: yes yes yes yes yes yes"
    free = await _tokens(served, prompt)
    assert free.count(" yes") == 16, free  # greedy decoding repeats it to the end
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = await _tokens(served, prompt, **penalty)
        assert penalised.count(" yes") < 8, (penalty, penalised)


async def test_context_length_and_token_count(served: Served, tokenizer: Any) -> None:
    async with raw(served.api) as http:
        checked = (await http.post("/api/v1/token_check", json={
            "prompts": [{"model": MODEL, "prompt": "Hello there", "max_tokens": 10}]})).json()["prompts"][0]
    assert checked["tokenCount"] == len(tokenizer.encode("Hello there"))
    context = checked["contextLength"]
    assert context >= 2048
    with pytest.raises(openai.BadRequestError) as too_long:
        await sdk(served.api).completions.create(model=MODEL, prompt="x", max_tokens=context + 1)
    assert too_long.value.code == "context_length_exceeded"


async def _running(worker: Target) -> float:
    async with raw(worker) as http:
        text = (await http.get("/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("chatgate_worker_running_sequences"))


LONG_STORY = {"model": MODEL, "messages": user("Write a very long story."), "max_tokens": 2000, "temperature": 1.0,
              "stream": True}


async def _leave_after_four_chunks(target: Target, worker: Target) -> None:
    """Read four chunks of a long stream, check the sequence runs, and leave."""
    if isinstance(target, str):
        stream = await sdk(target).chat.completions.create(**LONG_STORY)  # type: ignore[call-overload]
        for _ in range(4):
            await anext(aiter(stream))
        assert await _running(worker) == 1
        await stream.close()
        return
    # In process, the SDK's ASGI transport buffers a whole response: drive the app as a server
    # would instead, and disconnect once four chunks are out.
    leave, sent = asyncio.Event(), list[dict[str, Any]]()
    task = asyncio.create_task(call(target, LONG_STORY, leave=leave, sent=sent))
    await apoll(lambda: len(sent) > 4, what="four chunks sent", timeout=60)
    assert await _running(worker) == 1
    leave.set()
    await asyncio.wait_for(task, 10)


async def test_a_client_that_leaves_cancels_its_sequence(served: Served) -> None:
    await _leave_after_four_chunks(served.api, served.worker)

    async def freed() -> bool:
        return await _running(served.worker) == 0

    # 2000 tokens would take minutes on CPU: the engine must drop the sequence when the client goes.
    await apoll(freed, what="the sequence freed after the client left", timeout=10)
