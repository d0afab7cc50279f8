"""Shared fixtures: the whole API stack in one process, reached through in-process transports.

Typed helpers for the openai SDK live here too, so tests type-check under `mypy --strict`:
annotate message lists as `Messages` (or build one with `user("...")`), tools with `function_tool`,
`response_format` with `json_schema_format`, and narrow returned tool calls with `function_calls`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI
from openai.types.chat import (
    ChatCompletionFunctionToolParam,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
)
from openai.types.shared_params import ResponseFormatJSONSchema

from chatgate.api.app import create_api_app
from chatgate.api.workers.local import local_pool
from chatgate.engines.base import Engine
from chatgate.engines.fake import FakeEngine
from chatgate.settings import ServeSettings

if TYPE_CHECKING:
    from tests.support.vllm_procs import Fleet, OpenAIServer

Target = FastAPI | str
"""Where a test's requests go: an app in this process, or a live server's base URL."""


def pytest_configure(config: pytest.Config) -> None:
    """Torch work in the test process itself (reference models, quality gates) uses one intra-op
    thread, as the engines do: the processes the live tests start share the two cores, and
    OpenMP threads that spin for a busy core made one 48-step decode 15x slower (53 s vs 3.6 s)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[FastAPI]:
    """Run the app's lifespan around a test."""
    async with app.router.lifespan_context(app):
        yield app


def make_app(*engines: Engine, **settings: Any) -> FastAPI:
    """An API app serving `engines` in-process; `settings` are `ServeSettings` fields (stored
    responses in memory unless they say otherwise: tests leave no file in the cache)."""
    serve = ServeSettings(**{"responses_store": "memory", **settings})
    return create_api_app(serve, local_pool(serve, engines=list(engines)))


def sdk(app: Target, api_key: str = "sk-test") -> openai.AsyncOpenAI:
    """The official SDK, talking to `app` without a network (or to a live server at that URL)."""
    if isinstance(app, str):
        # No kept-alive connections: a client the test never closes leaves nothing for the
        # garbage collector to close on a later test's event loop.
        http = httpx2.AsyncClient(timeout=300, limits=httpx2.Limits(max_keepalive_connections=0))
        return openai.AsyncOpenAI(base_url=f"{app}/v1", api_key=api_key, http_client=http, max_retries=0)
    transport = httpx2.ASGITransport(app=app)
    http_client = httpx2.AsyncClient(transport=transport, base_url="http://chatgate")
    return openai.AsyncOpenAI(
        base_url="http://chatgate/v1", api_key=api_key, http_client=http_client, max_retries=0
    )


Messages = list[ChatCompletionMessageParam]
"""A conversation as the SDK takes it: `ASK: Messages = [{"role": "user", "content": "..."}]`."""


def user(content: str) -> Messages:
    """A one-turn conversation: `messages=user("hi")`."""
    return [{"role": "user", "content": content}]


def as_dicts(items: Iterable[Mapping[str, object]]) -> list[dict[str, Any]]:
    """SDK params (messages, tools) as the plain dicts an engine renders: `engine.render_chat(as_dicts(USER))`."""
    return [dict(item) for item in items]


def function_tool(name: str, description: str, parameters: dict[str, object]) -> ChatCompletionFunctionToolParam:
    """A `tools` entry offering one function."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def json_schema_format(name: str, schema: dict[str, object], strict: bool = True) -> ResponseFormatJSONSchema:
    """A JSON-schema `response_format`."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


def function_calls(message: ChatCompletionMessage) -> list[ChatCompletionMessageFunctionToolCall]:
    """A reply's tool calls, each checked to be a function call (the SDK also types custom-tool calls)."""
    calls = message.tool_calls or []
    assert all(isinstance(call, ChatCompletionMessageFunctionToolCall) for call in calls), calls
    return [call for call in calls if isinstance(call, ChatCompletionMessageFunctionToolCall)]


def raw(app: Target) -> httpx.AsyncClient:
    """A raw HTTP client for `app` (or a live server at that URL)."""
    if isinstance(app, str):
        return httpx.AsyncClient(base_url=app, timeout=300)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://chatgate")


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(name="fake-model", context_length=1024)


@pytest.fixture
async def fake_app(fake_engine: FakeEngine) -> AsyncIterator[FastAPI]:
    async with running(make_app(fake_engine)) as app:
        yield app


# The runners our own engine serves the default model on; each engine is loaded once per session.
RUNNERS = ["torch", "llama.cpp"]


def runner_engine(runner: str, **settings: Any) -> Engine:
    """Our engine on `runner` over the default model, with `EngineSettings` fields `settings`
    (skips the test where llama-cpp-python is not installed)."""
    from chatgate.settings import EngineSettings

    if runner == "llama.cpp":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")
        from chatgate.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(EngineSettings(**settings))
    from chatgate.engines.transformers import TransformersEngine

    return TransformersEngine(EngineSettings(**settings))


def runner_of(engine: Engine) -> str:
    """Which of `RUNNERS` our `engine` runs on."""
    return "llama.cpp" if type(engine).__name__ == "LlamaCppEngine" else "torch"


@pytest.fixture(scope="session")
def torch_engine() -> Engine:
    """The default chat model on the torch runner, loaded once per test session."""
    return runner_engine("torch")


@pytest.fixture(scope="session")
def llama_engine() -> Engine:
    """The default chat model on the llama.cpp runner (bfloat16), loaded once per test session."""
    return runner_engine("llama.cpp")


@pytest.fixture(scope="session", params=RUNNERS)
def chat_engine(request: pytest.FixtureRequest) -> Engine:
    """The default chat model, once per runner (each app starts and stops it)."""
    engine: Engine = request.getfixturevalue("llama_engine" if request.param == "llama.cpp" else "torch_engine")
    return engine


@pytest.fixture
async def chat_app(chat_engine: Engine) -> AsyncIterator[FastAPI]:
    """An API app serving the real default chat model."""
    async with running(make_app(chat_engine)) as app:
        yield app


@pytest.fixture(scope="session")
def model_folder() -> Path:
    """The default chat model's converted float32 folder (tokenizer and weights)."""
    from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
    from chatgate.settings import default_cache_dir

    return cached_checkpoint(resolve_chat_model("default"), default_cache_dir())


@pytest.fixture(scope="session")
def tokenizer(model_folder: Path) -> Any:
    """The default model's own Hugging Face tokenizer, for expected token counts under any engine."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder)


@dataclass
class VllmBoot:
    """The session's vLLM processes, launched when the session starts (see `vllm_boot`)."""

    server: OpenAIServer
    fleet: Fleet


def _wants_vllm(session: pytest.Session) -> bool:
    names = {"vllm_openai", "vllm_fleet"}
    return any(names & set(getattr(item, "fixturenames", ())) or "[vllm]" in item.nodeid for item in session.items)


@pytest.fixture(scope="session", autouse=True)
def vllm_boot(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmBoot | None]:
    """Launch vLLM's OpenAI server and the vllm-worker fleet when the session starts, if any
    selected test uses them: their ~30 s of mostly single-threaded boot then overlaps the first
    tests (which use one core) instead of blocking the first vLLM test."""
    from tests.support.vllm_procs import VLLM_READY, OpenAIServer, launch_vllm_fleet

    if not VLLM_READY or not _wants_vllm(request.session):
        yield None
        return
    server = OpenAIServer.start(tmp_path_factory.mktemp("vllm-openai"))
    try:
        fleet = launch_vllm_fleet(tmp_path_factory.mktemp("vllm-fleet"))
    except BaseException:
        server.process.stop()
        raise
    yield VllmBoot(server, fleet)
    fleet.stop()
    server.process.stop()


@pytest.fixture(scope="session")
def vllm_openai(vllm_boot: VllmBoot | None) -> OpenAIServer:
    """vLLM's own OpenAI server, launched once per session (or skipped); call `ready()` before use.
    `tests/live/test_vllm_upstream.py` kills it in its last test: nothing after may use it."""
    from tests.support.vllm_procs import require_vllm

    require_vllm()
    assert vllm_boot is not None
    return vllm_boot.server


@pytest.fixture(scope="session")
def vllm_fleet(vllm_boot: VllmBoot | None) -> Fleet:
    """controller + `worker --engine vllm` + API server, started once per session (or skipped)."""
    from tests.support.vllm_procs import finish_vllm_fleet, require_vllm

    require_vllm()
    assert vllm_boot is not None
    if "api" not in vllm_boot.fleet.processes:
        finish_vllm_fleet(vllm_boot.fleet)
    return vllm_boot.fleet


@dataclass
class Served:
    """The default model behind chatgate's API through one engine: `api` takes the requests,
    `worker` reports the engine's running sequences in its `/metrics`."""

    api: Target
    worker: Target
    # How far its log-probabilities may be from float32 transformers' (llama.cpp serves bfloat16).
    logprob_tolerance: float = 1e-3


ENGINES = [*RUNNERS, pytest.param("vllm", marks=pytest.mark.live)]


@pytest.fixture(params=ENGINES)
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """The API behaviour checks run once per engine: ours on each runner in this process, `vllm`
    as a live fleet in the optional vLLM venv (shared by the session; skipped where it is missing)."""
    if request.param == "vllm":
        fleet: Fleet = request.getfixturevalue("vllm_fleet")
        yield Served(fleet.url["api"], fleet.url["vllm"])
        return
    llama = request.param == "llama.cpp"
    engine: Engine = request.getfixturevalue("llama_engine" if llama else "torch_engine")
    async with running(make_app(engine)) as app:
        yield Served(app, app, logprob_tolerance=0.1 if llama else 1e-3)
