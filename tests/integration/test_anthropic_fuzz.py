"""Property-based fuzzing of Anthropic's routes: generated Messages and token-count bodies, valid
and not, never get a 5xx or hang; every refusal is in Anthropic's error shape, and every stream
ends with `message_stop` or an `error` event."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fuzzing import Harness, anything, schemas, still_answers, texts

M = "fake-model"

blocks = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "tool_use", "tool_result", "image", "thinking"]) | anything},
    optional={"text": texts | anything, "id": texts, "name": st.sampled_from(["f", "bad name"]) | texts,
              "input": st.dictionaries(st.text(max_size=4), anything, max_size=2) | anything,
              "tool_use_id": texts, "content": texts | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=2) | anything,
              "is_error": st.booleans() | anything},
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", ""]) | anything},
    optional={"content": st.text(max_size=30) | st.lists(blocks, max_size=3) | anything},
) | anything
tool = st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g"]) | texts},
    optional={"input_schema": schemas, "description": texts, "type": st.sampled_from(["custom", "bash_20250124"]) | anything},
) | anything
bodies = st.fixed_dictionaries(
    {"model": st.just(M) | texts | anything},
    optional={
        "messages": st.lists(message, min_size=0, max_size=4) | anything,
        "max_tokens": st.integers(-2, 40) | st.integers() | anything,
        "system": texts | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=2) | anything,
        "stop_sequences": st.lists(texts, max_size=6) | anything,
        "temperature": st.floats() | anything, "top_p": st.floats() | anything, "top_k": st.integers() | anything,
        "tools": st.lists(tool, max_size=3) | anything,
        "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none", "x"])}, optional={"name": st.sampled_from(["f", "g", "h"])}) | anything,
        "metadata": st.fixed_dictionaries({}, optional={"user_id": texts | anything}) | anything,
        "stream": st.booleans() | anything,
    },
)
# Well-formed bodies with one field at a time varied, so generations are reached too.
valid = st.fixed_dictionaries(
    {"model": st.just(M), "max_tokens": st.integers(1, 30),
     "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=20) | st.lists(blocks, max_size=2)}), min_size=1, max_size=2)},
    optional={"stream": st.booleans(), "stop_sequences": st.lists(st.text(min_size=1, max_size=3), max_size=4),
              "temperature": st.floats(0, 1), "top_k": st.integers(1, 50), "system": st.text(max_size=20)},
)
requests = st.tuples(st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]), valid | bodies)


def problem(response: httpx.Response) -> str | None:
    """What is wrong with a response to a fuzzed request, if anything."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()
        if body.get("type") != "error" or set(body.get("error") or {}) != {"type", "message"}:
            return f"{response.status_code} without an Anthropic error: {response.text[:300]}"
    elif response.headers["content-type"].startswith("text/event-stream"):
        last = [e for e in response.text.split("\n\n") if e][-1]
        if not last.startswith(("event: message_stop", "event: error")):
            return f"stream without message_stop: {response.text[-300:]}"
    return None


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests)
def test_no_messages_request_gets_a_5xx_or_hangs(harness: Harness, request: tuple[str, Any]) -> None:
    path, body = request
    response = harness.send(path, json.dumps(body, allow_nan=True).encode())
    assert response is not None, f"hang: {path}"
    assert problem(response) is None, problem(response)


def test_server_still_answers_after_fuzzing(harness: Harness) -> None:
    if sum(harness.statuses.values()) < 300:  # run alone: do the fuzzing this test follows
        test_no_messages_request_gets_a_5xx_or_hangs(harness=harness)
    assert harness.statuses[200] >= 10, harness.statuses  # the fuzzer reaches real generations too
    assert still_answers(harness)
