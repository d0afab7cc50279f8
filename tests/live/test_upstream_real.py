"""The `openai` engine in front of a chatgate upstream serving the real default model: the answer
comes through, and tool calls and `response_format` go upstream and come back as OpenAI's."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from tests.support.processes import Process, free_port

pytestmark = [pytest.mark.live, pytest.mark.model, pytest.mark.untimed]

M = "SmolLM2-135M-Instruct"


def test_paris_and_a_tool_call_through_the_openai_engine(tmp_path: Path) -> None:
    up, front = free_port(), free_port()
    upstream = Process(["serve", "--port", str(up), "--embedding-model-path", "none", "--no-playground"],
                       tmp_path / "upstream.log")
    forward = Process(["serve", "--engine", "openai", "--upstream-url", f"http://127.0.0.1:{up}/v1", "--port",
                       str(front), "--embedding-model-path", "none", "--no-playground"], tmp_path / "front.log")
    try:
        upstream.wait_healthy(f"http://127.0.0.1:{up}", deadline=300)
        forward.wait_healthy(f"http://127.0.0.1:{front}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{front}/v1", api_key="none", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list()] == [M]
        answer = client.chat.completions.create(
            model=M, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
            max_tokens=30)
        print("through the openai engine:", answer.choices[0].message.content)
        assert "Paris" in (answer.choices[0].message.content or "")

        tool = {"type": "function", "function": {"name": "weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
        called = client.chat.completions.create(  # type: ignore[call-overload]
            model=M, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool],
            tool_choice={"type": "function", "function": {"name": "weather"}}, temperature=0, max_tokens=60)
        choice = called.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        assert "city" in json.loads(choice.message.tool_calls[0].function.arguments)
    finally:
        forward.stop()
        upstream.stop()
