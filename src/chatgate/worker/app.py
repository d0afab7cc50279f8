"""The model worker process: FastChat's worker endpoints over one `WorkerService`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from fastapi.responses import JSONResponse

from chatgate.engines import create_engine
from chatgate.engines.base import Engine
from chatgate.errors import ChatgateError
from chatgate.metrics import FleetCollector, mount
from chatgate.protocol.worker import (
    CountTokenRequest,
    EmbedParams,
    GenerateParams,
    WorkerChunk,
    WorkerUsage,
)
from chatgate.responses import ClosingStreamingResponse
from chatgate.settings import WorkerSettings
from chatgate.streams import chain, empty, primed
from chatgate.worker.heartbeat import Heartbeat
from chatgate.worker.service import WorkerService

log = logging.getLogger(__name__)


def _error_chunk(exc: Exception) -> WorkerChunk:
    if isinstance(exc, ChatgateError):
        return WorkerChunk(text=exc.message, error_code=exc.fastchat_code, param=exc.param)
    log.exception("generation failed", exc_info=exc)
    return WorkerChunk(text="The worker failed while generating.", error_code=50001)


async def _encoded(chunks: AsyncGenerator[WorkerChunk, None]) -> AsyncIterator[bytes]:
    """NUL-delimited JSON, as FastChat's /worker_generate_stream sends it."""
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk.model_dump_json().encode() + b"\0"
    except Exception as exc:
        yield _error_chunk(exc).model_dump_json().encode() + b"\0"


def create_worker_app(settings: WorkerSettings, *, engine: Engine | None = None) -> FastAPI:
    """Build the worker app; the engine is created from settings unless one is given."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = engine or create_engine(settings)
        await model.start()
        service = WorkerService(
            engine=model,
            model_names=settings.model_names,
            limit_concurrency=settings.limit_worker_concurrency,
        )
        app.state.service = service
        async with httpx.AsyncClient(timeout=10.0) as http:
            task = None
            if not settings.no_register:
                beat = Heartbeat(
                    http=http,
                    controller=settings.controller_address,
                    address=settings.address(),
                    service=service,
                    interval=settings.heartbeat_interval,
                )
                task = asyncio.create_task(beat.run())
            try:
                yield
            finally:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await service.close()
                await model.close()

    app = FastAPI(title="chatgate worker", lifespan=lifespan)

    def service() -> WorkerService:
        return app.state.service  # type: ignore[no-any-return]

    registry = CollectorRegistry()
    registry.register(
        FleetCollector(
            workers_per_model=lambda: {name: 1 for name in service().model_names},
            worker_load=lambda: [(settings.address(), *service().load())],
            served=lambda: {service().model_names[0]: service().served},
        )
    )
    mount(app, registry)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, object]:
        return {"status": "ready", "models": service().model_names}

    @app.post("/worker_generate_stream")
    async def generate_stream(params: GenerateParams) -> ClosingStreamingResponse:
        try:
            chunks = await primed(service().generate(params))
        except Exception as exc:
            chunks = chain(_error_chunk(exc), empty())
        return ClosingStreamingResponse(_encoded(chunks), media_type="application/octet-stream")

    @app.post("/worker_generate")
    async def generate(params: GenerateParams) -> JSONResponse:
        last = WorkerChunk(usage=WorkerUsage())
        text = ""
        try:
            async for chunk in service().generate(params.model_copy(update={"delta": True})):
                text += chunk.text
                last = chunk
        except Exception as exc:
            return JSONResponse(_error_chunk(exc).model_dump())
        return JSONResponse(last.model_copy(update={"text": text}).model_dump())

    @app.post("/worker_get_embeddings")
    async def get_embeddings(params: EmbedParams) -> JSONResponse:
        try:
            result = await service().embed(params)
        except Exception as exc:
            return JSONResponse(_error_chunk(exc).model_dump())
        return JSONResponse(result.model_dump())

    @app.post("/worker_get_status")
    async def status() -> dict[str, object]:
        return service().status().model_dump()

    @app.post("/count_token")
    async def count_token(request: CountTokenRequest) -> dict[str, int]:
        return {"count": service().count_tokens(request), "error_code": 0}

    @app.post("/worker_get_conv_template")
    async def conv_template() -> dict[str, object]:
        return {"conv": service().conversation().model_dump()}

    @app.post("/model_details")
    async def model_details() -> dict[str, object]:
        return service().details().model_dump()

    return app
