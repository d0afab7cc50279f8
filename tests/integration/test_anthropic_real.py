"""Anthropic's `/v1/messages` on the real default model, on every runner, through the official
`anthropic` SDK: a reply and its stream agree, a stop sequence ends it, token counts match, and a
tool round trip (a forced `tool_use` whose input fits the schema, then its `tool_result`)."""

from __future__ import annotations

from collections.abc import Sequence

import jsonschema
import pytest
from anthropic.types import MessageParam, TextBlock, ToolParam, ToolUseBlock
from fastapi import FastAPI

from tests.support.anthropic_sdk import anthropic_sdk

pytestmark = [pytest.mark.anyio, pytest.mark.model]

MODEL = "SmolLM2-135M-Instruct"
GREEDY = {"temperature": 0}
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ASK: list[MessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER: dict[str, object] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[ToolParam] = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER}]


def text_of(content: Sequence[object]) -> str:
    """The text blocks of a reply, joined."""
    return "".join(block.text for block in content if isinstance(block, TextBlock))


async def test_reply_stream_stop_sequence_and_count(chat_app: FastAPI) -> None:
    client = anthropic_sdk(chat_app)
    whole = await client.messages.create(model=MODEL, max_tokens=24, messages=ASK, system=SYSTEM, extra_body=GREEDY)
    text = text_of(whole.content)
    assert "Paris" in text and whole.stop_reason in ("end_turn", "max_tokens")
    async with client.messages.stream(model=MODEL, max_tokens=24, messages=ASK, system=SYSTEM, extra_body=GREEDY) as stream:
        deltas = [event.delta.text async for event in stream if event.type == "content_block_delta" and event.delta.type == "text_delta"]
        final = await stream.get_final_message()
    assert "".join(deltas) == text_of(final.content) == text and final.stop_reason == whole.stop_reason
    assert (final.usage.input_tokens, final.usage.output_tokens) == (whole.usage.input_tokens, whole.usage.output_tokens)
    count = await client.messages.count_tokens(model=MODEL, messages=ASK, system=SYSTEM)
    assert count.input_tokens == whole.usage.input_tokens
    cut = await client.messages.create(
        model=MODEL, max_tokens=24, messages=ASK, system=SYSTEM, stop_sequences=["Paris"], extra_body=GREEDY
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == "Paris"
    assert text_of(cut.content) == text[: text.index("Paris")]


async def test_tool_round_trip(chat_app: FastAPI) -> None:
    client = anthropic_sdk(chat_app)
    ask: list[MessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = await client.messages.create(
        model=MODEL, max_tokens=80, messages=ask, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY
    )
    assert forced.stop_reason == "tool_use"
    uses = [block for block in forced.content if isinstance(block, ToolUseBlock)]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, WEATHER)
    async with client.messages.stream(
        model=MODEL, max_tokens=80, messages=ask, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY
    ) as stream:
        streamed = await stream.get_final_message()
    streamed_uses = [block for block in streamed.content if isinstance(block, ToolUseBlock)]
    assert streamed.stop_reason == "tool_use" and [u.input for u in streamed_uses] == [uses[0].input]
    history: list[MessageParam] = [
        *ask,
        {"role": "assistant", "content": [{"type": "tool_use", "id": uses[0].id, "name": "get_weather", "input": uses[0].input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 degrees and sunny"}]},
    ]
    answer = await client.messages.create(model=MODEL, max_tokens=30, messages=history, tools=TOOLS, tool_choice={"type": "none"}, extra_body=GREEDY)
    assert answer.stop_reason in ("end_turn", "max_tokens") and text_of(answer.content)
    assert answer.usage.input_tokens > forced.usage.input_tokens  # the call and its result were read
