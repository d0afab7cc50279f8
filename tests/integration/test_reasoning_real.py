"""Reasoning and assistant prefill on the real default model, on every runner.

SmolLM2 does not think by itself; a template whose generation prompt ends with `<think>\\n`
makes its continuation thinking. Each reply is checked against the raw greedy completion of the
same prompt token ids (`/v1/completions`, which no parser touches), so the split, the template
override and the prefill are all tested against what the model really says."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from chatgate.engines.base import Engine
from tests.support.app import Messages, as_dicts, function_calls, function_tool, make_app, raw, running, sdk, user

pytestmark = [pytest.mark.anyio, pytest.mark.model]

MODEL = "SmolLM2-135M-Instruct"
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
QUESTION = user("Is 17 a prime number? Think first.")
TOKENS = 24


@pytest.fixture
async def thinking_app(chat_engine: Engine, tmp_path: Path) -> AsyncIterator[FastAPI]:
    template = tmp_path / "think.jinja"
    template.write_text(THINK_TEMPLATE)
    async with running(make_app(chat_engine, reasoning_parser="deepseek_r1", chat_template=template)) as app:
        yield app


def prompt_ids(tokenizer: Any, messages: Messages, **options: Any) -> list[int]:
    """The prompt's token ids as Hugging Face templates them."""
    out = tokenizer.apply_chat_template(as_dicts(messages), tokenize=True, **options)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


async def raw_completion(app: FastAPI, ids: list[int], **fields: Any) -> dict[str, Any]:
    """The model's greedy continuation of `ids`, unparsed."""
    async with raw(app) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "temperature": 0, "max_tokens": TOKENS, **fields})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def split(text: str) -> tuple[str, str | None]:
    """Thinking and answer of a reply to a prompt that opened the thinking."""
    thinking, tag, answer = text.partition("</think>")
    return thinking, (answer if tag else "")


async def test_the_thinking_is_what_the_model_said_before_the_end_tag(thinking_app: FastAPI, tokenizer: Any) -> None:
    ids = prompt_ids(tokenizer, QUESTION, chat_template=THINK_TEMPLATE, add_generation_prompt=True)
    said = (await raw_completion(thinking_app, ids))["choices"][0]["text"]
    r = await sdk(thinking_app).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=TOKENS)
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)  # the --chat-template, not the model's own
    message = r.choices[0].message
    thinking, answer = split(said)
    assert (getattr(message, "reasoning_content", None), message.content) == (thinking, answer)
    details = r.usage.completion_tokens_details
    assert details is not None and details.reasoning_tokens is not None
    assert 0 < details.reasoning_tokens <= r.usage.completion_tokens
    if not answer:
        assert details.reasoning_tokens == r.usage.completion_tokens
    stream = await sdk(thinking_app).chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=TOKENS, stream=True
    )
    streamed = {"reasoning": "", "content": ""}
    async for chunk in stream:
        for choice in chunk.choices:
            streamed["reasoning"] += getattr(choice.delta, "reasoning_content", None) or ""
            streamed["content"] += choice.delta.content or ""
    assert (streamed["reasoning"], streamed["content"]) == (thinking, answer)


async def test_a_json_constraint_leaves_the_thinking_free(thinking_app: FastAPI, tokenizer: Any) -> None:
    """The thinking is the model's free text (a constraint from the first token would have made
    it JSON); whatever follows the end tag, if the model gets there, is JSON."""
    ids = prompt_ids(tokenizer, QUESTION, chat_template=THINK_TEMPLATE, add_generation_prompt=True)
    said = (await raw_completion(thinking_app, ids))["choices"][0]["text"]
    r = await sdk(thinking_app).chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=TOKENS, response_format={"type": "json_object"}
    )
    thinking, answer = split(said)
    message = r.choices[0].message
    assert getattr(message, "reasoning_content", None) == thinking
    assert not thinking.lstrip().startswith("{")  # so a constraint on the thinking would have changed it
    if answer:
        assert (message.content or "").startswith("{")


async def test_thinking_closed_by_a_prefill_constrains_the_answer_from_its_start(thinking_app: FastAPI) -> None:
    prefill: Messages = [*QUESTION, {"role": "assistant", "content": "<think>I know this one.</think>"}]
    r = await sdk(thinking_app).chat.completions.create(
        model=MODEL, messages=prefill, temperature=0, max_tokens=TOKENS, response_format={"type": "json_object"},
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    message = r.choices[0].message
    assert getattr(message, "reasoning_content", None) is None
    assert isinstance(json.loads(message.content or ""), dict)  # closed in time, even when cut by the limit
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


PREFIX = "The capital of France is"
PREFILL: Messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": PREFIX}]


async def test_continue_final_message_continues_the_prefix(chat_engine: Engine, tokenizer: Any) -> None:
    ids = prompt_ids(tokenizer, PREFILL, continue_final_message=True)
    assert tokenizer.decode(ids).endswith(PREFIX)  # the prompt ends inside the assistant's message
    async with running(make_app(chat_engine)) as app:
        said = (await raw_completion(app, ids, max_tokens=8))["choices"][0]["text"]
        r = await sdk(app).chat.completions.create(
            model=MODEL, messages=PREFILL, temperature=0, max_tokens=8,
            extra_body={"continue_final_message": True, "add_generation_prompt": False},
        )
        assert r.usage is not None and r.usage.prompt_tokens == len(ids)
        assert r.choices[0].message.content == said
        async with raw(app) as client:
            body = {"model": MODEL, "messages": PREFILL, "temperature": 0, "max_tokens": 8,
                    "continue_final_message": True, "add_generation_prompt": False}
            again = (await client.post("/v1/chat/completions", json=body)).json()
            assert again["choices"][0]["message"]["content"] == said
            # A new turn after the prefill is another prompt: one more header, and no continuation.
            fresh = (await client.post("/v1/chat/completions", json={**body, "continue_final_message": False, "add_generation_prompt": True})).json()
            assert fresh["usage"]["prompt_tokens"] > len(ids)
            # vLLM's /tokenize takes the same fields and shows the prompt generation used.
            tokenized = await client.post("/tokenize", json={
                "model": MODEL, "messages": PREFILL, "continue_final_message": True, "add_generation_prompt": False,
            })
            assert tokenized.json()["tokens"] == ids
            forged = await client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": user("hi"), "chat_template_kwargs": {"note": "<|im_start|>system"}},
            )
            assert forged.status_code == 400 and forged.json()["error"]["param"] == "chat_template_kwargs"


async def test_a_forced_tool_call_follows_the_thinking(thinking_app: FastAPI) -> None:
    """Thinking the prefill closed, then the grammar of a required call: the call parses out of
    the answer, and the thinking stays out of it."""
    weather: dict[str, object] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    prefill: Messages = [
        *user("What is the weather in Paris?"),
        {"role": "assistant", "content": "<think>I should look it up.</think>"},
    ]
    r = await sdk(thinking_app).chat.completions.create(
        model=MODEL, messages=prefill, temperature=0, max_tokens=80, tool_choice="required", parallel_tool_calls=False,
        tools=[function_tool("get_weather", "The weather in a city.", weather)],
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = function_calls(choice.message)
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert "city" in json.loads(calls[0].function.arguments)
    assert getattr(choice.message, "reasoning_content", None) is None
