"""Real processes on free ports, driven by the official openai SDK: `serve`, and the
three-process mode (controller, worker, api) that must give the same greedy answers."""

from __future__ import annotations

from dataclasses import dataclass

import anthropic
import httpx
import openai
import pytest

from tests.support.app import Messages
from tests.support.polling import poll
from tests.support.processes import Process, free_port

# Timed: the controller drops a worker after 6 s without a heartbeat, and several calls keep
# httpx's 5 s default; beside model tests in two processes it once failed, alone it passes.
pytestmark = pytest.mark.live

MODEL = "SmolLM2-135M-Instruct"
PARIS: Messages = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Stack:
    serve: str
    api: str
    controller: str
    worker: str


@pytest.fixture(scope="module")
def stack(processes: list[Process], tmp_path_factory: pytest.TempPathFactory) -> Stack:
    logs = tmp_path_factory.mktemp("logs")
    ports = {name: free_port() for name in ("serve", "api", "controller", "worker")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    controller = Process(["controller", "--host", "127.0.0.1", "--port", str(ports["controller"]),
                          "--heartbeat-expiration", "6"], logs / "controller.log")
    processes.append(controller)
    serve = Process(["serve", "--port", str(ports["serve"])], logs / "serve.log")
    processes.append(serve)
    worker = Process(["worker", "--host", "127.0.0.1", "--port", str(ports["worker"]),
                      "--controller-address", urls["controller"], "--heartbeat-interval", "1"], logs / "worker.log")
    processes.append(worker)
    api = Process(["api", "--port", str(ports["api"]), "--controller-address", urls["controller"],
                   "--worker-table-refresh", "0.5"], logs / "api.log")
    processes.append(api)
    for name, process in (("controller", controller), ("serve", serve), ("worker", worker), ("api", api)):
        process.wait_healthy(urls[name])
    # The worker registers right after its model loads; wait until the API server sees it.
    poll(lambda: MODEL in [m.id for m in client(urls["api"]).models.list().data],
         what="the worker appears behind the API server", timeout=30, interval=0.3)
    return Stack(**urls)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0, timeout=120)


def test_every_process_answers_health(stack: Stack) -> None:
    for url in (stack.serve, stack.api, stack.controller, stack.worker):
        assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize("mode", ["serve", "api"])
def test_sdk_against_both_modes(stack: Stack, mode: str) -> None:
    c = client(getattr(stack, mode))
    assert MODEL in [m.id for m in c.models.list().data]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=PARIS)
    answer = c.chat.completions.create(model=MODEL, messages=PARIS, temperature=0)
    assert "Paris" in (answer.choices[0].message.content or "")
    stream = c.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == answer.choices[0].message.content
    completion = c.completions.create(model=MODEL, prompt=["Once upon a time", "Hello"], max_tokens=8, n=2, temperature=0)
    assert len(completion.choices) == 4 and all(ch.finish_reason == "length" for ch in completion.choices)


def test_three_process_mode_gives_the_same_greedy_answers(stack: Stack) -> None:
    prompts: list[Messages] = [
        [{"role": "user", "content": "Name three colours."}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}],
    ]
    for messages in prompts:
        a = client(stack.serve).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30)
        b = client(stack.api).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.usage == b.usage
    ca = client(stack.serve).completions.create(model=MODEL, prompt="The sky is", max_tokens=16, temperature=0)
    cb = client(stack.api).completions.create(model=MODEL, prompt="The sky is", max_tokens=16, temperature=0)
    assert ca.choices[0].text == cb.choices[0].text


def test_embeddings_in_both_modes(stack: Stack) -> None:
    minilm = client(stack.serve).embeddings.create(model="all-MiniLM-L6-v2", input=["hello", "world"])
    assert [len(d.embedding) for d in minilm.data] == [384, 384]
    # The chat model's own embeddings, over the worker protocol in three-process mode.
    texts = ["The cat sat.", "Stocks fell."]
    remote = client(stack.api).embeddings.create(model=MODEL, input=texts)
    local = client(stack.serve).embeddings.create(model=MODEL, input=texts)
    assert [len(d.embedding) for d in remote.data] == [576, 576]
    for a, b in zip(remote.data, local.data, strict=True):
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-4
    assert remote.usage == local.usage
    with pytest.raises(openai.BadRequestError) as err:
        client(stack.api).embeddings.create(model=MODEL, input=[[1, 10**7]])
    assert err.value.param == "input"


@pytest.mark.parametrize("mode", ["serve", "api"])
def test_anthropic_messages_and_rerank_in_both_modes(stack: Stack, mode: str) -> None:
    url = getattr(stack, mode)
    c = anthropic.Anthropic(base_url=url, api_key="anything", max_retries=0, timeout=120)
    ask: list[anthropic.types.MessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
    # The stop string that matched crosses the worker protocol (a chatgate extension).
    m = c.messages.create(model=MODEL, max_tokens=30, messages=ask, stop_sequences=["Paris"], extra_body={"temperature": 0})
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "Paris"
    assert c.messages.count_tokens(model=MODEL, messages=ask).input_tokens == m.usage.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        c.messages.create(model="no-such-model", max_tokens=5, messages=ask)
    r = httpx.post(f"{url}/v1/rerank", json={"model": MODEL, "query": "cats", "documents": ["a cat", "stocks"]}, timeout=60)
    assert r.status_code == 200 and sorted(x["index"] for x in r.json()["results"]) == [0, 1]


def test_errors_cross_the_worker_protocol(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(stack.api).completions.create(model=MODEL, prompt="hi", max_tokens=100_000)
    assert err.value.code == "context_length_exceeded"


def test_disconnected_stream_stops_generation_on_the_worker(stack: Stack) -> None:
    c = client(stack.api)
    stream = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=2000, temperature=0, stream=True,
    )
    for i, _ in enumerate(stream):
        if i >= 3:
            break
    stream.close()
    poll(lambda: httpx.post(f"{stack.worker}/worker_get_status").json()["queue_length"] == 0,
         what="generation stops after the client left", timeout=10, interval=0.1)


@pytest.mark.parametrize("mode", ["serve", "api"])
def test_values_json_cannot_carry_are_a_400_in_both_modes(stack: Stack, mode: str) -> None:
    """NaN, Infinity and lone surrogates once made the API server fail to forward the request."""
    head = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}]' % MODEL
    cases = {
        "presence_penalty": head + ', "presence_penalty": NaN}',
        "repetition_penalty": head + ', "repetition_penalty": Infinity}',
        "tools[0].function.parameters": head + ', "tools": [{"type": "function", "function": {"name": "f", '
                                                '"parameters": {"type": "object", "maximum": -Infinity}}}]}',
        "messages[0].content": '{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % MODEL,
    }
    url = getattr(stack, mode)
    for param, body in cases.items():
        response = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                          json={"model": MODEL, "messages": PARIS, "max_tokens": 4, "logit_bias": {"49152": 1}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"
