"""Interoperability with FastChat 0.2.36 (from PyPI, in its own venv `.venv-fastchat`, as it needs
transformers 4.x): FastChat's API server in front of a chatgate controller and worker, and a
chatgate API server in front of FastChat's controller and model_worker. Skipped where the
FastChat venv could not be installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
from chatgate.protocol.conversation import Conversation, SeparatorStyle, render
from chatgate.settings import EngineSettings
from tests.support.app import Messages
from tests.support.polling import poll
from tests.support.processes import Process, free_port

ROOT = Path(__file__).resolve().parents[2]
FASTCHAT_PYTHON = Path(os.environ.get("CHATGATE_FASTCHAT_PYTHON", ROOT / ".venv-fastchat" / "bin" / "python"))
MODEL = "SmolLM2-135M-Instruct"
PARIS: Messages = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = [
    pytest.mark.live,
    pytest.mark.untimed,
    pytest.mark.fastchat,
    pytest.mark.skipif(not FASTCHAT_PYTHON.exists(), reason="FastChat venv not installed (make fastchat)"),
]


class FastChatProcess(Process):
    """A FastChat server module run with the FastChat venv's interpreter."""

    def __init__(self, module: str, args: list[str], log: Path) -> None:
        self.log = log
        self._file = log.open("wb")
        self._group = False
        env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
        # FastChat writes log files into its working directory: keep them beside ours.
        self.proc = subprocess.Popen([str(FASTCHAT_PYTHON), "-m", module, *args], stdout=self._file,
                                     stderr=subprocess.STDOUT, env=env, cwd=log.parent)


def wait_for(check: Callable[[], bool], what: str, process: Process, deadline: float = 120) -> None:
    def ready() -> bool:
        if process.proc.poll() is not None:
            pytest.fail(f"{what} exited:\n{process.tail()}")
        return check()

    poll(ready, what=f"{what} ready", timeout=deadline, interval=0.3, ignore=(httpx.HTTPError,), details=process.tail)


def fastchat_model_dir(tmp: Path) -> Path:
    """The converted default model, with the config keys transformers 4.x reads."""
    source = cached_checkpoint(resolve_chat_model("default"), EngineSettings().cache_dir)
    target = tmp / MODEL
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    config.setdefault("torch_dtype", "float32")
    (target / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((target / "tokenizer_config.json").read_text())
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 names it otherwise
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return target


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


@dataclass
class Stack:
    api: str
    processes: list[Process]


def listed(controller: str) -> bool:
    return MODEL in httpx.post(f"{controller}/list_models", timeout=2).json().get("models", [])


@pytest.fixture(scope="module")
def fastchat_api_over_chatgate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("fc-over-cg")
    c, w, a = free_port(), free_port(), free_port()
    controller = f"http://127.0.0.1:{c}"
    procs: list[Process] = []
    try:
        procs.append(Process(["controller", "--host", "127.0.0.1", "--port", str(c)], logs / "controller.log"))
        procs[-1].wait_healthy(controller)
        procs.append(Process(["worker", "--host", "127.0.0.1", "--port", str(w), "--controller-address", controller,
                              "--heartbeat-interval", "1"], logs / "worker.log"))
        wait_for(lambda: listed(controller), "chatgate worker", procs[-1])
        procs.append(FastChatProcess("fastchat.serve.openai_api_server", ["--host", "127.0.0.1", "--port", str(a),
                                     "--controller-address", controller], logs / "fastchat-api.log"))
        url = f"http://127.0.0.1:{a}"
        wait_for(lambda: httpx.get(f"{url}/v1/models", timeout=2).status_code == 200, "FastChat API server", procs[-1])
        yield Stack(url, procs)
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(scope="module")
def chatgate_api_over_fastchat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("cg-over-fc")
    model_dir = fastchat_model_dir(tmp_path_factory.mktemp("model"))
    c, w, a = free_port(), free_port(), free_port()
    controller = f"http://127.0.0.1:{c}"
    procs: list[Process] = []
    try:
        procs.append(FastChatProcess("fastchat.serve.controller", ["--host", "127.0.0.1", "--port", str(c)], logs / "controller.log"))
        wait_for(lambda: httpx.post(f"{controller}/list_models", timeout=2).status_code == 200, "FastChat controller", procs[-1])
        procs.append(FastChatProcess("fastchat.serve.model_worker", [
            "--host", "127.0.0.1", "--port", str(w), "--worker-address", f"http://127.0.0.1:{w}",
            "--controller-address", controller, "--model-path", str(model_dir), "--model-names", MODEL, "--device", "cpu",
        ], logs / "fastchat-worker.log"))
        wait_for(lambda: listed(controller), "FastChat model_worker", procs[-1], deadline=180)
        procs.append(Process(["api", "--port", str(a), "--controller-address", controller], logs / "api.log"))
        url = f"http://127.0.0.1:{a}"
        procs[-1].wait_healthy(url)
        yield Stack(url, procs)
    finally:
        for p in reversed(procs):
            p.stop()


def exercise(url: str) -> str:
    """Chat, streaming, completions and embeddings through the openai SDK; returns the chat answer."""
    c = client(url)
    assert MODEL in [m.id for m in c.models.list().data]
    answer = c.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=40)
    text = answer.choices[0].message.content or ""
    assert text and answer.usage is not None and answer.usage.completion_tokens > 0
    stream = c.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=40, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == text
    completion = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert completion.choices[0].text and completion.choices[0].finish_reason == "length"
    streamed = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == completion.choices[0].text
    vectors = c.embeddings.create(model=MODEL, input=["hello world", "goodbye"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 576
    return text


def test_fastchat_api_server_in_front_of_chatgate(fastchat_api_over_chatgate: Stack) -> None:
    text = exercise(fastchat_api_over_chatgate.api)
    # The worker describes SmolLM2's own ChatML template, so FastChat builds the same prompt.
    assert "Paris" in text


def test_chatgate_api_server_in_front_of_fastchat(chatgate_api_over_fastchat: Stack) -> None:
    exercise(chatgate_api_over_fastchat.api)
    with pytest.raises(openai.NotFoundError):
        client(chatgate_api_over_fastchat.api).chat.completions.create(model="nope", messages=PARIS)


def test_prompts_match_fastchat_conversation_templates() -> None:
    """Our rendering of FastChat's conversation templates equals FastChat's own, template by template."""
    script = ROOT / "tests" / "live" / "fastchat_templates.py"
    result = subprocess.run([str(FASTCHAT_PYTHON), str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    supported = {s.value for s in SeparatorStyle} - {SeparatorStyle.LLAMA2, SeparatorStyle.CHATGLM}
    checked = 0
    for case in json.loads(result.stdout):
        if case["template"]["sep_style"] not in supported:
            continue
        conv = Conversation.model_validate(case["template"])
        for messages, expected in zip(case["conversations"], case["prompts"], strict=True):
            assert render(conv, messages) == expected, case["template"]["name"]
            checked += 1
    assert checked >= 50
