"""The `openai` engine in front of vLLM's own OpenAI server, and a mixed fleet around it.

The session's vLLM OpenAI server (see `tests/support/vllm_procs.py`): a chatgate `serve --engine
openai` forwards to it, and each answer is compared with vLLM's own answer to the same request.
The module ends with the mixed fleet: the session's vllm-worker fleet gains a `transformers`
worker and an `openai` worker forwarding to that server, all under one model name; then the
server is killed. That test kills the session's vLLM server, so it stays the last one here.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.support.live_fleet import streamed_chats
from tests.support.processes import Process, free_port, requests_served_at
from tests.support.vllm_procs import M, Fleet, OpenAIServer

pytestmark = [pytest.mark.live, pytest.mark.model]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"],
           "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "weather", "description": "Weather in a city", "parameters": WEATHER}}


@pytest.fixture(scope="module")
def upstream(vllm_openai: OpenAIServer) -> tuple[Process, str]:
    """vLLM's OpenAI server (the session's; float32, eager) and its base URL."""
    server = vllm_openai.ready()
    return server.process, server.url


@pytest.fixture(scope="module")
def front(upstream: tuple[Process, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`chatgate serve --engine openai` forwarding to the vLLM server; no embedding model asked for."""
    port = free_port()
    log = tmp_path_factory.mktemp("front") / "front.log"
    process = Process(["serve", "--engine", "openai", "--upstream-url", f"{upstream[1]}/v1", "--port", str(port),
                       "--no-playground"], log)
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_healthy(url)
        yield url
    finally:
        process.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def both(front: str, upstream: tuple[Process, str], path: str, body: dict[str, Any]) -> tuple[Any, Any]:
    """The same request to vLLM directly and through chatgate's `openai` engine: (direct, forwarded)."""
    answers = [httpx.post(f"{url}/v1{path}", json={"model": M, **body}, timeout=300) for url in (upstream[1], front)]
    for answer in answers:
        assert answer.status_code == 200, answer.text
    return answers[0].json(), answers[1].json()


def test_only_the_upstream_models_are_served(front: str) -> None:
    # `serve --engine openai` leaves the embedding model out unless asked (the upstream may embed).
    assert [m.id for m in client(front).models.list()] == [M]


def test_chat_is_vllms_answer_streamed_and_not(front: str, upstream: tuple[Process, str]) -> None:
    direct, forwarded = both(front, upstream, "/chat/completions", {"messages": FRANCE, "temperature": 0, "max_tokens": 30})
    print("vLLM float32 through the openai engine:", forwarded["choices"][0]["message"]["content"])
    assert "Paris" in forwarded["choices"][0]["message"]["content"]
    assert forwarded["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert forwarded["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert forwarded["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]
    chunks = list(client(front).chat.completions.create(  # type: ignore[call-overload]
        model=M, messages=FRANCE, temperature=0, max_tokens=30, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct["choices"][0]["message"]["content"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == direct["usage"]["completion_tokens"]


def test_completions_streamed_and_seeded(front: str, upstream: tuple[Process, str]) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 7}
    direct, forwarded = both(front, upstream, "/completions", body)
    assert forwarded["choices"][0]["text"] == direct["choices"][0]["text"]
    stream = client(front).completions.create(model=M, stream=True, **body)  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in stream if c.choices) == direct["choices"][0]["text"]


def test_logprobs_are_vllms(front: str, upstream: tuple[Process, str]) -> None:
    direct, forwarded = both(front, upstream, "/chat/completions", {
        "messages": FRANCE, "temperature": 0, "max_tokens": 5, "logprobs": True, "top_logprobs": 2})
    mine, theirs = (answer["choices"][0]["logprobs"]["content"] for answer in (forwarded, direct))
    assert [t["token"] for t in mine] == [t["token"] for t in theirs]
    assert [t["logprob"] for t in mine] == pytest.approx([t["logprob"] for t in theirs], abs=1e-4)
    assert all(len(t["top_logprobs"]) == 2 for t in mine)


def test_echo_scores_the_prompt_as_vllm_does(front: str, upstream: tuple[Process, str]) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "logprobs": 1, "echo": True}
    direct, forwarded = both(front, upstream, "/completions", body)
    mine, theirs = forwarded["choices"][0], direct["choices"][0]
    assert mine["text"] == theirs["text"] and mine["text"].startswith(body["prompt"])
    assert mine["logprobs"]["tokens"] == theirs["logprobs"]["tokens"]
    assert mine["logprobs"]["token_logprobs"][0] is None  # nothing precedes the first prompt token
    assert mine["logprobs"]["token_logprobs"][1:] == pytest.approx(theirs["logprobs"]["token_logprobs"][1:], abs=1e-4)
    stream = client(front).completions.create(model=M, stream=True, **body)  # type: ignore[call-overload]
    streamed = [v for c in stream if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs or []]
    assert streamed == mine["logprobs"]["token_logprobs"]


def test_tools_and_response_format_pass_through(front: str, upstream: tuple[Process, str]) -> None:
    ask = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [TOOL], "temperature": 0,
           "max_tokens": 60}
    for choice in ({"type": "function", "function": {"name": "weather"}}, "required"):
        direct, forwarded = both(front, upstream, "/chat/completions", {**ask, "tool_choice": choice})
        mine, theirs = (answer["choices"][0]["message"]["tool_calls"] for answer in (forwarded, direct))
        # vLLM 0.32's calls for this model carry arguments `"Paris"`, not the schema's object:
        # chatgate passes on what the upstream made, unchanged.
        print("vLLM's tool call through chatgate:", mine)
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in mine] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in theirs]
        assert forwarded["choices"][0]["finish_reason"] == "tool_calls"
    shaped = client(front).chat.completions.create(  # type: ignore[call-overload]
        model=M, messages=FRANCE, temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": WEATHER}})
    jsonschema.validate(json.loads(shaped.choices[0].message.content or ""), WEATHER)


def test_an_upstream_4xx_comes_back_with_its_status(front: str) -> None:
    # chatgate does not know the upstream's vocabulary, so vLLM is the one to refuse this id.
    with pytest.raises(openai.BadRequestError) as refused:
        client(front).completions.create(model=M, prompt="Hi", max_tokens=2, logit_bias={"999999": 5})
    print("vLLM's 400 through chatgate:", refused.value.message)
    assert refused.value.status_code == 400 and "999999" in refused.value.message


SHORT_CHAT = {"model": M, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}


def test_mixed_fleet_balances_and_fails_over(vllm_fleet: Fleet, upstream: tuple[Process, str]) -> None:
    """Last in the module: it kills the upstream."""
    fleet = vllm_fleet
    names = ("vllm", "transformers", "openai")
    try:
        fleet.worker("transformers", "--engine", "transformers", "--model-names", M, deadline=300)
        fleet.worker("openai", "--engine", "openai", "--upstream-url", f"{upstream[1]}/v1")
        fleet.wait_workers(3)
        before = [requests_served_at(fleet.url[n]) for n in names]
        assert asyncio.run(streamed_chats(fleet.url["api"], SHORT_CHAT, 24)) == [200] * 24
        balanced = [requests_served_at(fleet.url[n]) - b for n, b in zip(names, before, strict=True)]
        print("requests per worker (vllm, transformers, openai):", balanced)
        assert all(count > 0 for count in balanced)  # every engine took traffic

        upstream[0].signal(signal.SIGKILL)  # the server and its engine processes
        upstream[0].proc.wait()
        assert asyncio.run(streamed_chats(fleet.url["api"], SHORT_CHAT, 24)) == [200] * 24  # every request failed over
        after = [requests_served_at(fleet.url[n]) - b for n, b in zip(names, before, strict=True)]
        print("after the kill:", after)
        assert after[0] + after[1] - balanced[0] - balanced[1] == 24  # the others answered them all
    finally:
        fleet.stop("transformers", "openai")
        fleet.wait_workers(1)  # the session's fleet is back to its vllm worker
