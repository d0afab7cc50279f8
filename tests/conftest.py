"""Shared fixtures: the whole API stack in one process, reached through in-process transports;
the default model on each runner; the session's vLLM processes. Their helpers live in tests/support."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi import FastAPI

from chatgate.engines.base import Engine
from chatgate.engines.fake import FakeEngine
from tests.support.app import make_app, running
from tests.support.runners import ENGINES, RUNNERS, Served, runner_engine

if TYPE_CHECKING:
    from tests.support.vllm_procs import Fleet, OpenAIServer, VllmBoot


def pytest_configure(config: pytest.Config) -> None:
    """Torch work in the test process itself (reference models, quality gates) uses one intra-op
    thread, as the engines do: the processes the live tests start share the two cores, and
    OpenMP threads that spin for a busy core made one 48-step decode 15x slower (53 s vs 3.6 s)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(name="fake-model", context_length=1024)


@pytest.fixture
async def fake_app(fake_engine: FakeEngine) -> AsyncIterator[FastAPI]:
    async with running(make_app(fake_engine)) as app:
        yield app


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


@pytest.fixture(scope="session", autouse=True)
def vllm_boot(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmBoot | None]:
    """Launch vLLM's OpenAI server and the vllm-worker fleet when the session starts, if any
    selected test uses them: their ~30 s of mostly single-threaded boot then overlaps the first
    tests (which use one core) instead of blocking the first vLLM test."""
    from tests.support.vllm_procs import VLLM_READY, OpenAIServer, VllmBoot, launch_vllm_fleet, wants_vllm

    if not VLLM_READY or not wants_vllm(request.session):
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
