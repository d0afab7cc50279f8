"""`--engine vllm`: chatgate's API over vLLM in the worker process, in the optional `.venv-vllm`.

One `serve --engine vllm` process for the module (vLLM CPU takes minutes to start), float32 as
chatgate serves this model; the official SDK as the client. Skipped where `.venv-vllm` does not
exist (`make vllm` builds it; `CHATGATE_VLLM_PYTHON` points elsewhere).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.live.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("CHATGATE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
# `make vllm` stamps the venv once every install step has passed; a half-built venv is skipped.
VLLM_READY = "CHATGATE_VLLM_PYTHON" in os.environ or (ROOT / ".venv-vllm" / ".installed").exists()
M = "SmolLM2-135M-Instruct"

pytestmark = [
    pytest.mark.live,
    pytest.mark.model,
    pytest.mark.skipif(not VLLM_READY, reason="vLLM venv not installed (make vllm)"),
]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    args = [str(VLLM_PYTHON), "-m", "chatgate.cli", "serve", "--engine", "vllm", "--dtype", "float32",
            "--max-model-len", "4096", "--model-names", M, "--embedding-model-path", "none", "--no-playground",
            "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # vLLM CPU compiles and warms up at start
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"vLLM serve not healthy in 900 s:\n{log.read_text()[-3000:]}")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_float32_says_paris_and_streams_the_same(url: str) -> None:
    answer = client(url).chat.completions.create(model=M, messages=FRANCE, temperature=0, max_tokens=30)  # type: ignore[arg-type]
    text = answer.choices[0].message.content or ""
    print("vLLM float32 answer:", text)
    assert "Paris" in text
    assert answer.usage is not None and answer.usage.prompt_tokens > 5 and answer.usage.completion_tokens > 0
    chunks = list(client(url).chat.completions.create(model=M, messages=FRANCE, temperature=0, max_tokens=30,  # type: ignore[call-overload]
                                                      stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_completions_n_seed_stop_and_logprobs(url: str) -> None:
    kwargs = dict(model=M, prompt="Once upon a time", max_tokens=12, n=2, seed=7, temperature=1.0, logprobs=2,
                  presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"0": -100})
    first = client(url).completions.create(**kwargs)  # type: ignore[call-overload]
    again = client(url).completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded
    assert len(first.choices) == 2
    lp = first.choices[0].logprobs
    assert lp is not None and lp.top_logprobs and all(len(t) <= 2 for t in lp.top_logprobs)
    stopped = client(url).completions.create(model=M, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert stopped.choices[0].finish_reason == "stop" and " 7" not in stopped.choices[0].text


def test_response_format_and_required_tool(url: str) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    answer = client(url).chat.completions.create(  # type: ignore[call-overload]
        model=M, messages=FRANCE, temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert set(json.loads(answer.choices[0].message.content or "")) == {"city"}
    tool = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    called = client(url).chat.completions.create(  # type: ignore[call-overload]
        model=M, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool],
        tool_choice="required", temperature=0, max_tokens=60)
    calls = called.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "weather"
    assert "city" in json.loads(calls[0].function.arguments)


def test_context_length_and_token_count(url: str) -> None:
    checked = httpx.post(f"{url}/api/v1/token_check",
                         json={"prompts": [{"model": M, "prompt": "Hello there", "max_tokens": 10}]}).json()
    result = checked["prompts"][0]
    assert result["contextLength"] == 4096 and 1 <= result["tokenCount"] <= 5
    with pytest.raises(openai.BadRequestError) as too_long:
        client(url).completions.create(model=M, prompt="x", max_tokens=5000)
    assert too_long.value.code == "context_length_exceeded"


def _running(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("chatgate_worker_running_sequences"))


def test_disconnect_aborts_in_vllm(url: str) -> None:
    body = {"model": M, "prompt": "Write a very long story.", "max_tokens": 2000, "stream": True,
            "temperature": 1.0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert _running(url) == 1
    deadline = time.monotonic() + 10  # 2000 tokens would take minutes on CPU
    while _running(url) != 0:
        assert time.monotonic() < deadline, "the sequence kept running after the client left"
        time.sleep(0.2)
