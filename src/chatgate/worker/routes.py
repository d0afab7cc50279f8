"""FastChat's worker endpoints: thin adapters from HTTP to the app's `WorkerService`.

Errors go back the way FastChat's API server expects them: as a chunk with an `error_code`
(NUL-delimited in a stream), never as an HTTP error status.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from chatgate.errors import ChatgateError
from chatgate.protocol.worker import (
    CountTokenRequest,
    DetokenizeParams,
    EmbedParams,
    EmbedResult,
    GenerateParams,
    TokenizeParams,
    WorkerChunk,
    WorkerUsage,
)
from chatgate.responses import ClosingStreamingResponse
from chatgate.streams import chain, empty, primed
from chatgate.worker.service import WorkerService

log = logging.getLogger(__name__)

router = APIRouter()

T = TypeVar("T")


def worker_service(request: Request) -> WorkerService:
    """Route dependency: the service the app's lifespan built."""
    service: WorkerService = request.app.state.service
    return service


Service = Depends(worker_service)


def _error_chunk(exc: Exception) -> WorkerChunk:
    if isinstance(exc, ChatgateError):
        return WorkerChunk(text=exc.message, error_code=exc.fastchat_code, param=exc.param)
    log.exception("generation failed", exc_info=exc)
    return WorkerChunk(text="The worker failed while generating.", error_code=50001)


async def _answer(work: Awaitable[T], body: Callable[[T], Any]) -> JSONResponse:
    """The JSON answer to `work`, or FastChat's error object (an error code, status 200) if it fails."""
    try:
        return JSONResponse(body(await work))
    except Exception as exc:
        return JSONResponse(_error_chunk(exc).model_dump())


async def _encoded(chunks: AsyncGenerator[WorkerChunk, None]) -> AsyncIterator[bytes]:
    """NUL-delimited JSON, as FastChat's /worker_generate_stream sends it."""
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk.model_dump_json().encode() + b"\0"
    except Exception as exc:
        yield _error_chunk(exc).model_dump_json().encode() + b"\0"


@router.get("/ready")
async def ready(service: WorkerService = Service) -> dict[str, object]:
    """The worker is ready once its engine has started (the lifespan waits for it)."""
    return {"status": "ready", "models": service.model_names}


@router.post("/worker_generate_stream")
async def generate_stream(params: GenerateParams, service: WorkerService = Service) -> ClosingStreamingResponse:
    """Stream a generation as NUL-delimited chunks."""
    try:
        chunks = await primed(service.generate(params))
    except Exception as exc:
        chunks = chain(_error_chunk(exc), empty())
    return ClosingStreamingResponse(_encoded(chunks), media_type="application/octet-stream")


@router.post("/worker_generate")
async def generate(params: GenerateParams, service: WorkerService = Service) -> JSONResponse:
    """A whole generation as one chunk: all the text, the last chunk's usage and finish."""
    last = WorkerChunk(usage=WorkerUsage())
    text = ""
    try:
        async for chunk in service.generate(params.model_copy(update={"delta": True})):
            text += chunk.text
            last = chunk
    except Exception as exc:
        return JSONResponse(_error_chunk(exc).model_dump())
    return JSONResponse(last.model_copy(update={"text": text}).model_dump())


@router.post("/worker_get_embeddings")
async def get_embeddings(params: EmbedParams, service: WorkerService = Service) -> JSONResponse:
    """Embedding vectors of the inputs."""
    return await _answer(service.embed(params), EmbedResult.model_dump)


@router.post("/worker_get_status")
async def status(service: WorkerService = Service) -> dict[str, object]:
    """Model names, speed and queue length, as the controller wants them."""
    return service.status().model_dump()


@router.post("/count_token")
async def count_token(request: CountTokenRequest, service: WorkerService = Service) -> JSONResponse:
    """Tokens the prompt takes (or an error: a prompt too long to possibly fit is not counted)."""
    return await _answer(service.count_tokens(request), lambda count: {"count": count, "error_code": 0})


@router.post("/tokenize")
async def tokenize(params: TokenizeParams, service: WorkerService = Service) -> JSONResponse:
    """Token ids as generation encodes the prompt (the `tokenize` extension)."""
    return await _answer(service.tokenize(params), lambda r: r.model_dump(exclude_none=True))


@router.post("/detokenize")
async def detokenize(params: DetokenizeParams, service: WorkerService = Service) -> JSONResponse:
    """The text of token ids (the `tokenize` extension)."""
    return await _answer(service.detokenize(params), lambda r: r.model_dump())


@router.post("/worker_get_conv_template")
async def conv_template(service: WorkerService = Service) -> dict[str, object]:
    """The model's chat template as a FastChat conversation."""
    return {"conv": service.conversation().model_dump()}


@router.post("/model_details")
async def model_details(service: WorkerService = Service) -> dict[str, object]:
    """Context length and the chatgate extensions this worker supports."""
    return service.details().model_dump()
