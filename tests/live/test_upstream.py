"""The `openai` engine against a real upstream: another chatgate `serve` process (fake engine).

Every answer through the forwarding worker is compared with the upstream's own answer to the
same request, through the worker protocol behind a controller and API server, and in-process
(`serve --engine openai`). Upstream errors keep their status; a dead upstream is a 503.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.processes import Process, free_port

pytestmark = pytest.mark.live

M = "fake-model"
KEY = "sk-upstream"
CHAT = [{"role": "user", "content": "Say something about forwarding."}]


class Fleet:
    """An upstream, a controller, an `openai` worker, an API server, and a `serve --engine openai`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = {n: free_port() for n in ("upstream", "controller", "worker", "api", "serve")}
        self.url = {n: f"http://127.0.0.1:{p}" for n, p in self.port.items()}
        self.processes: list[Process] = []

    def start(self, name: str, args: list[str]) -> Process:
        process = Process([*args, "--port", str(self.port[name])], self.tmp / f"{name}.log")
        self.processes.append(process)
        return process

    def upstream(self) -> Process:
        return self.start("upstream", ["serve", "--engine", "fake", "--model-names", M, "--fake-token-delay", "0.05",
                                       "--embedding-model-path", "none", "--api-keys", KEY, "--admin-keys", KEY,
                                       "--no-playground"])

    def client(self, name: str, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url[name]}/v1", api_key=key, max_retries=0, timeout=60)


def _wait(predicate, deadline: float) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"condition not met in {deadline}s")


def _models(url: str) -> list[str]:
    try:
        return [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=2).json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError):
        return []


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("upstream"))
    upstream_v1 = f"{fleet.url['upstream']}/v1"
    try:
        fleet.upstream().wait_healthy(fleet.url["upstream"])
        fleet.start("controller", ["controller", "--host", "127.0.0.1"]).wait_healthy(fleet.url["controller"])
        fleet.start("worker", ["worker", "--engine", "openai", "--upstream-url", upstream_v1, "--upstream-api-key", KEY,
                               "--host", "127.0.0.1", "--controller-address", fleet.url["controller"],
                               "--heartbeat-interval", "1"]).wait_healthy(fleet.url["worker"])
        fleet.start("api", ["api", "--controller-address", fleet.url["controller"], "--worker-table-refresh", "0.5",
                            "--no-playground"]).wait_healthy(fleet.url["api"])
        fleet.start("serve", ["serve", "--engine", "openai", "--upstream-url", upstream_v1, "--upstream-api-key", KEY,
                              "--embedding-model-path", "none", "--no-playground"]).wait_healthy(fleet.url["serve"])
        _wait(lambda: M in _models(fleet.url["api"]), 20)
        yield fleet
    finally:
        for process in reversed(fleet.processes):
            process.stop()


FRONTS = ["api", "serve"]


@pytest.mark.parametrize("front", FRONTS)
def test_models_are_the_upstreams(fleet: Fleet, front: str) -> None:
    assert _models(fleet.url[front]) == [M]


@pytest.mark.parametrize("front", FRONTS)
def test_chat_matches_the_upstream(fleet: Fleet, front: str) -> None:
    direct = fleet.client("upstream", KEY).chat.completions.create(model=M, messages=CHAT, temperature=0)  # type: ignore[arg-type]
    through = fleet.client(front).chat.completions.create(model=M, messages=CHAT, temperature=0)  # type: ignore[arg-type]
    assert through.choices[0].message.content == direct.choices[0].message.content
    assert direct.choices[0].message.content and direct.choices[0].message.content.startswith("Echo:")
    assert through.usage is not None and direct.usage is not None
    assert (through.usage.prompt_tokens, through.usage.completion_tokens) == (
        direct.usage.prompt_tokens, direct.usage.completion_tokens)


@pytest.mark.parametrize("front", FRONTS)
def test_streamed_chat_with_logprobs_and_usage(fleet: Fleet, front: str) -> None:
    kwargs = dict(model=M, messages=CHAT, temperature=0, logprobs=True, top_logprobs=2, stream=True,
                  stream_options={"include_usage": True})
    direct = list(fleet.client("upstream", KEY).chat.completions.create(**kwargs))  # type: ignore[call-overload]
    through = list(fleet.client(front).chat.completions.create(**kwargs))  # type: ignore[call-overload]

    def text(chunks: list) -> str:  # type: ignore[type-arg]
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def tokens(chunks: list) -> list[tuple[str, int]]:  # type: ignore[type-arg]
        return [(t.token, len(t.top_logprobs)) for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content or []]

    assert text(through) == text(direct) and text(direct)
    assert tokens(through) == tokens(direct) and tokens(direct)
    assert [c.choices[0].finish_reason for c in through if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert through[-1].usage is not None and through[-1].usage.total_tokens == direct[-1].usage.total_tokens


@pytest.mark.parametrize("front", FRONTS)
def test_completions_streamed_and_not(fleet: Fleet, front: str) -> None:
    kwargs = dict(model=M, prompt="The forwarding worker", temperature=0, max_tokens=8, seed=3, stop=["zzz"])
    direct = fleet.client("upstream", KEY).completions.create(**kwargs)  # type: ignore[call-overload]
    through = fleet.client(front).completions.create(**kwargs)  # type: ignore[call-overload]
    assert through.choices[0].text == direct.choices[0].text and len(direct.choices[0].text) > 0
    assert through.choices[0].finish_reason == direct.choices[0].finish_reason == "length"
    streamed = fleet.client(front).completions.create(**kwargs, stream=True)  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in streamed if c.choices) == direct.choices[0].text


@pytest.mark.parametrize("front", FRONTS)
def test_embeddings_match_the_upstream(fleet: Fleet, front: str) -> None:
    texts = ["one", "two words"]
    direct = fleet.client("upstream", KEY).embeddings.create(model=M, input=texts)
    through = fleet.client(front).embeddings.create(model=M, input=texts)
    assert [d.embedding for d in through.data] == [d.embedding for d in direct.data]
    assert through.usage.prompt_tokens == direct.usage.prompt_tokens > 0


@pytest.mark.parametrize("front", FRONTS)
def test_upstream_4xx_reach_the_client_with_their_status(fleet: Fleet, front: str) -> None:
    client = fleet.client(front)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=M, messages=CHAT, max_tokens=100_000)  # type: ignore[arg-type]
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as unsupported:  # the fake engine has no structured output
        client.chat.completions.create(model=M, messages=CHAT, response_format={"type": "json_object"})  # type: ignore[call-overload]
    assert "structured output" in unsupported.value.message


def test_wrong_upstream_key_is_a_502_that_names_nothing(fleet: Fleet, tmp_path: Path) -> None:
    port = free_port()
    process = Process(["serve", "--engine", "openai", "--upstream-url", f"{fleet.url['upstream']}/v1",
                       "--upstream-api-key", "sk-wrong", "--model-names", M, "--embedding-model-path", "none",
                       "--port", str(port)], tmp_path / "wrong-key.log")
    try:
        process.wait_healthy(f"http://127.0.0.1:{port}")
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": M, "messages": CHAT})
        # The operator's credentials failed, not the client's: a 502 naming neither key nor URL.
        assert response.status_code == 502
        assert set(response.json()["error"]) >= {"message", "type", "code"}
        assert "sk-wrong" not in response.text and "wrong" not in response.text
        assert fleet.url["upstream"] not in response.text and str(fleet.port["upstream"]) not in response.text
    finally:
        process.stop()


def test_worker_details_and_token_estimate(fleet: Fleet) -> None:
    details = httpx.post(f"{fleet.url['worker']}/model_details", json={}).json()
    assert details["token_count"] == "estimate" and details["upstream"].endswith("/v1")
    counted = httpx.post(f"{fleet.url['worker']}/count_token", json={"prompt": "x" * 40}).json()
    assert counted == {"count": 10, "error_code": 0}


def _running(url: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("chatgate_worker_running_sequences"))


@pytest.mark.parametrize("front", FRONTS)
def test_a_closed_stream_closes_the_upstream_stream(fleet: Fleet, front: str) -> None:
    body = {"model": M, "messages": [{"role": "user", "content": "a reply long enough to close early"}], "stream": True}
    with httpx.stream("POST", f"{fleet.url[front]}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        while '"content":"' not in next(lines):  # the role chunk
            pass
        generating = _running(fleet.url["upstream"])
        for line in lines:  # read one more token, then leave with the reply unfinished
            if '"content":"' in line:
                break
    assert generating == 1
    # About 50 tokens at 0.05 s remain: finishing on its own would take over 2 s.
    _wait(lambda: _running(fleet.url["upstream"]) == 0, 1.2)
