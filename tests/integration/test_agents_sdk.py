"""The OpenAI Agents SDK with its default model (`OpenAIResponsesModel`, i.e. `/v1/responses`)
against the real default model: a plain answer, run and streamed, and a run where the agent calls
a function tool and answers from its result."""

from __future__ import annotations

import json

import pytest
from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from agents.items import ToolCallItem, ToolCallOutputItem
from fastapi import FastAPI

from tests.support.app import sdk

pytestmark = [pytest.mark.anyio, pytest.mark.model]

MODEL = "SmolLM2-135M-Instruct"
# The small model answers plainly under its usual system prompt; under terse ones it may ramble.
INSTRUCTIONS = "You are a helpful assistant."


@pytest.fixture(autouse=True)
def no_tracing() -> None:
    set_tracing_disabled(True)  # tracing would export to OpenAI's servers


def agent(app: FastAPI, **fields: object) -> Agent[None]:
    model = OpenAIResponsesModel(model=MODEL, openai_client=sdk(app))
    # `store=False` and `truncation` are sent as the SDK sends them for any OpenAI-compatible server.
    settings = ModelSettings(temperature=0, max_tokens=60, store=False, truncation="disabled")
    return Agent(name="assistant", instructions=INSTRUCTIONS, model=model, model_settings=settings, **fields)  # type: ignore[arg-type]


async def test_plain_answer_run_and_streamed(chat_app: FastAPI) -> None:
    result = await Runner.run(agent(chat_app), "What is the capital of France?")
    assert "Paris" in result.final_output
    streamed = Runner.run_streamed(agent(chat_app), "What is the capital of France?")
    deltas = [e.data.delta async for e in streamed.stream_events() if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"]
    assert "".join(deltas) == streamed.final_output == result.final_output


async def test_agent_calls_a_function_tool_and_answers_from_its_result(chat_app: FastAPI) -> None:
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        cities.append(city)
        return json.dumps({"sky": "sunny", "celsius": 21})

    settings = ModelSettings(temperature=0, max_tokens=60, tool_choice="required", parallel_tool_calls=False, store=False)
    weather_agent = agent(chat_app, tools=[get_weather]).clone(model_settings=settings)
    result = await Runner.run(weather_agent, "What is the weather in Paris?", max_turns=3)
    kinds = [type(item) for item in result.new_items]
    assert kinds[:2] == [ToolCallItem, ToolCallOutputItem] and cities == ["Paris"], result.new_items
    assert "sunny" in result.final_output.lower()  # the tool's answer, read back by the model
