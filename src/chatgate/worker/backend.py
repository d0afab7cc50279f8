"""What the worker endpoints serve: a `WorkerBackend`, and how a worker opens one by engine name.

Most engines are token-level (`engines/base.py`) and are served by `WorkerService`, which applies
the chat template, tokenizes and enforces the context window. An OpenAI-compatible upstream works
at the request level instead (it templates and tokenizes itself), so it is a backend of its own,
`chatgate.upstream.service.UpstreamService`, behind the same worker endpoints and in-process seam.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from chatgate.engines.base import Engine, EngineStats
from chatgate.engines.memory import MemoryGuard, MemoryReader
from chatgate.errors import ChatgateError, StartupError
from chatgate.protocol.admin import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from chatgate.protocol.conversation import Conversation
from chatgate.protocol import worker as wire
from chatgate.settings import EngineSettings
from chatgate.tasks import cancel_and_wait, enter_together
from chatgate.worker.queue import RequestQueue

UPSTREAM_ENGINE = "openai"
# Engines that serve LoRA adapters (`auto` picks one of them for a chat model).
_LORA_ENGINES = frozenset({"auto", "transformers", "llama.cpp"})


class WorkerBackend(Protocol):
    """One worker's model(s), as its endpoints and the in-process client call them."""

    @property
    def model_names(self) -> list[str]:
        """Names served now: the model's, then any LoRA adapters' (these change)."""
        ...

    served: int
    queue: RequestQueue

    def generate(self, params: wire.GenerateParams) -> AsyncGenerator[wire.WorkerChunk, None]:
        """Stream a generation; request errors raise before the first chunk."""
        ...

    async def embed(self, params: wire.EmbedParams) -> wire.EmbedResult:
        """Embedding vectors of the inputs, in order."""
        ...

    async def count_tokens(self, request: wire.CountTokenRequest) -> int:
        """Tokens the prompt (or templated conversation) takes."""
        ...

    async def score_pairs(self, params: wire.ScorePairsParams) -> wire.ScorePairsResult:
        """A cross-encoder's score of each text pair."""
        ...

    async def tokenize(self, params: wire.TokenizeParams) -> wire.TokenizeResult:
        """Token ids of a prompt or conversation, as generation encodes it (the `tokenize` extension)."""
        ...

    async def detokenize(self, params: wire.DetokenizeParams) -> wire.DetokenizeResult:
        """The text of token ids (the `tokenize` extension)."""
        ...

    def load(self) -> tuple[int, int]:
        """Requests in flight, and sequences running or queued."""
        ...

    def status(self) -> wire.WorkerStatus:
        """What the worker reports to the controller."""
        ...

    def engine_stats(self) -> EngineStats | None:
        """The engine's counters for /metrics, if it keeps any."""
        ...

    def conversation(self) -> Conversation:
        """The chat template as a FastChat conversation."""
        ...

    def details(self) -> wire.ModelDetails:
        """Context length and supported extensions."""
        ...

    def knows(self, name: str) -> bool:
        """Whether `name` is one of this backend's own model names, loaded or not."""
        ...

    async def load_model(self) -> None:
        """Load the model (`/v1/models/load`)."""
        ...

    async def unload_model(self) -> None:
        """Free the model once its running requests finish (`/v1/models/unload`)."""
        ...

    def serves_lora(self) -> bool:
        """Whether LoRA adapters can be loaded beside this model."""
        ...

    def lora_names(self) -> list[str]:
        """The LoRA adapters served now."""
        ...

    async def load_lora(self, params: LoadLoraAdapterRequest) -> None:
        """Serve an adapter as a model of its own (400 if it cannot be)."""
        ...

    async def unload_lora(self, params: UnloadLoraAdapterRequest) -> None:
        """Stop serving an adapter once its running requests finish (404 if not loaded)."""
        ...


def request_queue(settings: EngineSettings, model: str) -> RequestQueue:
    """The bounds `settings` put on a worker's requests (`worker/queue.py`)."""
    return RequestQueue(model=model, limit=settings.limit_worker_concurrency, max_waiting=settings.max_waiting,
                        max_wait=settings.max_queue_wait)


def _served_name(settings: EngineSettings, engine: Engine) -> str:
    """The model's first name, before it has started (vLLM's engine knows its own only after)."""
    info = getattr(engine, "info", None)
    return settings.model_names[0] if settings.model_names else info.name if info is not None else settings.model_path


def _check_fits(guard: MemoryGuard, settings: EngineSettings, engine: Engine) -> None:
    """Refuse to start a model that would not fit in memory (`engines/memory.py`)."""
    guard.check_estimate(f"the model `{_served_name(settings, engine)}`", engine.memory_need)


@contextlib.asynccontextmanager
async def open_backend(
    settings: EngineSettings, *, engine: Engine | None = None, memory: MemoryReader | None = None,
    loads: asyncio.Lock | None = None,
) -> AsyncIterator[WorkerBackend]:
    """Start the backend `settings.engine` names (or serve the `engine` given), and stop it on
    exit; every later load of its model is first checked to fit in the memory `memory` reads
    (the machine's by default), one at a time with the other models holding `loads`."""
    if settings.lora and settings.engine not in _LORA_ENGINES:
        raise StartupError(f"--lora needs the transformers or llama.cpp engine, not --engine {settings.engine}")
    if engine is None and settings.engine == UPSTREAM_ENGINE:
        from chatgate.upstream.service import open_upstream

        async with open_upstream(settings) as upstream:
            yield upstream
        return
    from chatgate.engines import create_engine
    from chatgate.worker.lifecycle import start_engine
    from chatgate.worker.service import WorkerService

    engine = engine or create_engine(settings)
    guard = MemoryGuard.of(settings, memory, loads)
    await asyncio.to_thread(_check_fits, guard, settings, engine)  # reads files: off the event loop
    await start_engine(engine, name=_served_name(settings, engine))
    service = WorkerService(
        engine=engine, model_names=settings.model_names,
        queue=request_queue(settings, (settings.model_names or [engine.info.name])[0]),
        reasoning_parser=settings.reasoning_parser, chat_template=settings.chat_template_text(),
        idle_unload=settings.idle_unload, guard=guard,
    )
    idle = asyncio.create_task(service.lifecycle.watch_idle())
    try:
        yield service
    finally:
        await cancel_and_wait(idle)
        await service.close()
        await engine.close()


@contextlib.asynccontextmanager
async def open_backends(
    configs: list[tuple[EngineSettings, Engine | None]], *, memory: MemoryReader | None = None
) -> AsyncIterator[list[WorkerBackend]]:
    """Open a backend for each (settings, engine or None) at once (models take seconds each to
    load), their later loads taking turns on one lock (`MemoryGuard`); stop them all on exit."""
    loads = asyncio.Lock()
    async with contextlib.AsyncExitStack() as stack:
        try:
            backends = await enter_together(stack, [open_backend(c, engine=e, memory=memory, loads=loads) for c, e in configs])
        except (OSError, ChatgateError) as exc:  # a file that cannot be read or written, memory: the operator's to fix
            raise StartupError(_said(exc)) from exc
        yield backends


def _said(error: Exception) -> str:
    """An error's message, as a client would read it where it has one; a file error's says what
    kind it is (a timeout says nothing more)."""
    if isinstance(error, ChatgateError):
        return error.message
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
