"""Property-based fuzzing of the API: thousands of generated requests, none may get a 5xx or hang."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatgate.engines.fake import FakeEngine
from tests.conftest import make_app, raw

M = "fake-model"

scalars = (
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=12)
)
anything = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot", ""])
content = st.text(max_size=40) | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": st.text(max_size=10)}), max_size=2) | anything
message = st.fixed_dictionaries({"role": roles}, optional={"content": content, "name": st.text(max_size=5)}) | anything
numbers = st.floats(-5, 5) | st.integers(-5, 40) | anything
token_ids = st.lists(st.integers(-3, 300), max_size=6)
sampling: dict[str, Any] = {
    "model": st.sampled_from([M, M, M, "other", ""]) | anything,
    "n": st.integers(-1, 20) | anything,
    "temperature": numbers,
    "top_p": numbers,
    "top_k": numbers,
    "min_p": numbers,
    "presence_penalty": numbers,
    "frequency_penalty": numbers,
    "repetition_penalty": numbers,
    "max_tokens": st.integers(-2, 3000) | anything,
    "seed": st.integers() | anything,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | anything,
    "stream": st.booleans() | anything,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | anything,
    "logit_bias": st.dictionaries(st.text(max_size=4) | st.integers(0, 300).map(str), numbers, max_size=3) | anything,
    "unknown_field": anything,
}
chat_body = st.fixed_dictionaries({"model": sampling["model"], "messages": st.lists(message, max_size=3) | anything},
                                  optional={k: v for k, v in sampling.items() if k != "model"}
                                  | {"max_completion_tokens": numbers, "logprobs": st.booleans() | anything,
                                     "top_logprobs": st.integers(-1, 25) | anything,
                                     "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "x"])}) | anything,
                                     "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g", "bad name"])}, optional={"parameters": anything})}), max_size=2) | anything,
                                     "tool_choice": st.sampled_from(["none", "auto", "required"]) | anything,
                                     "functions": anything, "function_call": anything})
completion_body = st.fixed_dictionaries(
    {"model": sampling["model"], "prompt": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | token_ids | st.lists(token_ids, max_size=2) | anything},
    optional={k: v for k, v in sampling.items() if k != "model"} | {"echo": st.booleans() | anything, "logprobs": st.integers(-1, 7) | anything},
)
embedding_body = st.fixed_dictionaries(
    {"model": sampling["model"], "input": st.text(max_size=20) | st.lists(st.text(max_size=8), max_size=4) | token_ids | st.lists(token_ids, max_size=3) | anything},
    optional={"encoding_format": st.sampled_from(["float", "base64", "hex"]) | anything, "dimensions": st.integers(-1, 40) | anything, "user": anything},
)
token_check_body = st.fixed_dictionaries({"prompts": st.lists(st.fixed_dictionaries({"model": sampling["model"], "prompt": st.text(max_size=10) | anything, "max_tokens": numbers}), max_size=3) | anything})
# Bodies inside the schema, near its edges, so generation paths are fuzzed too, not only validation.
valid_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": st.text(max_size=40)})
valid_sampling: dict[str, Any] = {
    "n": st.integers(1, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "top_k": st.sampled_from([-1, 1, 5, 300]),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 3),
    "max_tokens": st.integers(1, 1100),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), min_size=1, max_size=4),
    "stream": st.booleans(),
    "logit_bias": st.dictionaries(st.integers(0, 400).map(str), st.floats(-100, 100), max_size=3),
}
valid_chat = st.fixed_dictionaries({"model": st.just(M), "messages": st.lists(valid_message, min_size=1, max_size=3)}, optional=valid_sampling)
valid_completion = st.fixed_dictionaries(
    {"model": st.just(M), "prompt": st.text(min_size=1, max_size=30) | st.lists(st.integers(0, 257), min_size=1, max_size=5)},
    optional=valid_sampling | {"echo": st.booleans()},
)
requests = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), valid_chat),
    st.tuples(st.just("/v1/completions"), valid_completion),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/api/v1/chat/completions"]), chat_body),
    st.tuples(st.just("/v1/completions"), completion_body),
    st.tuples(st.just("/api/v1/token_check"), token_check_body),
    st.tuples(st.sampled_from(["/v1/embeddings", f"/v1/engines/{M}/embeddings"]), embedding_body),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]), anything),
)


class Harness:
    """One app and event loop shared by every example."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.app = make_app(FakeEngine(context_length=1024), max_n=8)
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.loop.run_until_complete(self._lifespan.__aenter__())
        self.http: httpx.AsyncClient = raw(self.app)
        self.statuses: Counter[int] = Counter()

    def send(self, path: str, body: bytes) -> httpx.Response:
        request = self.http.post(path, content=body, headers={"content-type": "application/json"})
        response = self.loop.run_until_complete(asyncio.wait_for(request, timeout=20))
        self.statuses[response.status_code] += 1
        return response

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.run_until_complete(self._lifespan.__aexit__(None, None, None))
        self.loop.close()


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests)
def test_no_request_gets_a_5xx_or_hangs(harness: Harness, request: tuple[str, Any]) -> None:
    path, body = request
    response = harness.send(path, json.dumps(body, allow_nan=True).encode())
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in response.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", response.text[-300:]
    else:
        assert response.json()


def test_server_still_answers_after_fuzzing(harness: Harness) -> None:
    if sum(harness.statuses.values()) < 1000:  # run alone: do the fuzzing this test follows
        test_no_request_gets_a_5xx_or_hangs(harness=harness)
    assert sum(harness.statuses.values()) >= 1000
    assert harness.statuses[200] >= 50, harness.statuses  # the fuzzer reaches real generations too
    body = {"model": M, "messages": [{"role": "user", "content": "still there?"}], "temperature": 0}
    response = harness.send("/v1/chat/completions", json.dumps(body).encode())
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"].startswith("Echo:")
