"""FastChat's worker endpoints: thin adapters from HTTP to the app's `ServedModels`; each
request goes to the backend its `model` names (any name, or none, where one model is served).

Errors go back the way FastChat's API server expects them: as a chunk with an `error_code`
(NUL-delimited in a stream). The one exception is a worker that cannot serve at all right now
(its upstream is down, or it is shutting down): that answers HTTP 503, so an API server tries
another worker.

A stream whose request asks for `keepalive` carries the protocol's keep-alive frame while it is
silent; a worker that is shutting down (`chatgate.drain`) takes no new work and ends the
streams it still runs at its shutdown timeout with an error frame.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from chatgate.drain import Drain
from chatgate.errors import ChatgateError, WorkerUnavailableError
from chatgate.fleet import anonymous_probe
from chatgate.protocol.admin import AdminResult, LoadLoraAdapterRequest, ModelRequest, UnloadLoraAdapterRequest
from chatgate.protocol.worker import (
    EXT_KEEPALIVE,
    KEEPALIVE_FRAME,
    CountTokenRequest,
    DetokenizeParams,
    EmbedParams,
    EmbedResult,
    ScorePairsParams,
    ScorePairsResult,
    GenerateParams,
    ModelDetails,
    ModelQuery,
    TokenizeParams,
    WorkerChunk,
    WorkerUsage,
)
from chatgate.http_stream import ClosingStreamingResponse
from chatgate.streams import chain, empty, primed, with_beats
from chatgate.worker.backend import WorkerBackend
from chatgate.worker.served import ServedModels

log = logging.getLogger(__name__)

router = APIRouter()

T = TypeVar("T")


def served_models(request: Request) -> ServedModels:
    """Route dependency: the models the app's lifespan opened."""
    models: ServedModels = request.app.state.models
    return models


Models = Depends(served_models)


def worker_drain(request: Request) -> Drain:
    """Route dependency: the process's draining state."""
    drain: Drain = request.app.state.drain
    return drain


Draining = Depends(worker_drain)


class _Idle:
    """A keep-alive is due (the stream has been silent for the interval the request asked for)."""


_IDLE = _Idle()


def _error_chunk(exc: Exception) -> WorkerChunk:
    if isinstance(exc, ChatgateError):
        return WorkerChunk(text=exc.message, error_code=exc.fastchat_code, param=exc.param)
    log.exception("generation failed", exc_info=exc)
    return WorkerChunk(text="The worker failed while generating.", error_code=50001)


def _error_response(exc: Exception) -> JSONResponse:
    """The error as a worker-protocol body: HTTP 503 when the worker cannot serve, else 200."""
    status = 503 if isinstance(exc, WorkerUnavailableError) else 200
    return JSONResponse(_error_chunk(exc).model_dump(), status_code=status)


async def _answer(work: Callable[[], Awaitable[T]], body: Callable[[T], Any]) -> JSONResponse:
    """The JSON answer to `work`, or FastChat's error object if it fails (status 200, or 503
    when the worker cannot serve at all)."""
    try:
        return JSONResponse(body(await work()))
    except Exception as exc:
        return _error_response(exc)


def _answer_now(work: Callable[[], T], body: Callable[[T], Any]) -> JSONResponse:
    """`_answer` for work that does not wait."""
    try:
        return JSONResponse(body(work()))
    except Exception as exc:
        return _error_response(exc)


async def _encoded(chunks: AsyncGenerator[WorkerChunk | _Idle, None]) -> AsyncIterator[bytes]:
    """NUL-delimited JSON, as FastChat's /worker_generate_stream sends it (and keep-alive frames)."""
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield (KEEPALIVE_FRAME if isinstance(chunk, _Idle) else chunk.model_dump_json().encode()) + b"\0"
    except Exception as exc:
        yield _error_chunk(exc).model_dump_json().encode() + b"\0"


@router.get("/ready")
async def ready(request: Request, models: ServedModels = Models, drain: Drain = Draining) -> JSONResponse:
    """The worker is ready once its engine has started (the lifespan waits for it), and no
    longer once it is shutting down (503). A probe without the fleet key gets the status alone."""
    body: dict[str, object] = {"status": "shutting down" if drain.draining else "ready"}
    if not anonymous_probe(request):
        body["models"] = models.model_names
    return JSONResponse(body, status_code=503 if drain.draining else 200)


def _generation(params: GenerateParams, models: ServedModels, drain: Drain) -> AsyncGenerator[WorkerChunk, None]:
    """The generation of the backend `params.model` names, refused while draining and counted
    as running work."""
    drain.check()
    return drain.guard(models.backend_for(params.model).generate(params))


@router.post("/worker_generate_stream", response_model=None)
async def generate_stream(
    params: GenerateParams, models: ServedModels = Models, drain: Drain = Draining
) -> ClosingStreamingResponse | JSONResponse:
    """Stream a generation as NUL-delimited chunks. With `keepalive`, the response starts
    within that many seconds even before the first chunk, so a queued or prefilling request is
    told apart from a frozen worker (errors after that come as an error frame)."""
    started: AsyncGenerator[WorkerChunk | _Idle, None]
    try:
        chunks: AsyncGenerator[WorkerChunk | _Idle, None] = _generation(params, models, drain)
        if params.keepalive is not None:
            chunks = with_beats(chunks, every=params.keepalive, beat=_IDLE)
        started = await primed(chunks)
    except WorkerUnavailableError as exc:
        return _error_response(exc)
    except Exception as exc:
        started = chain(_error_chunk(exc), empty())
    return ClosingStreamingResponse(_encoded(started), media_type="application/octet-stream")


@router.post("/worker_generate")
async def generate(params: GenerateParams, models: ServedModels = Models, drain: Drain = Draining) -> JSONResponse:
    """A whole generation as one chunk: all the text, the last chunk's usage and finish."""
    last = WorkerChunk(usage=WorkerUsage())
    text = ""
    try:
        async for chunk in _generation(params.model_copy(update={"delta": True}), models, drain):
            text += chunk.text
            last = chunk
    except Exception as exc:
        return _error_response(exc)
    return JSONResponse(last.model_copy(update={"text": text}).model_dump())


async def _embed(params: EmbedParams, models: ServedModels, drain: Drain) -> EmbedResult:
    drain.check()
    return await models.backend_for(params.model).embed(params)


@router.post("/worker_get_embeddings")
async def get_embeddings(params: EmbedParams, models: ServedModels = Models, drain: Drain = Draining) -> JSONResponse:
    """Embedding vectors of the inputs."""
    return await _answer(lambda: _embed(params, models, drain), EmbedResult.model_dump)


async def _score(params: ScorePairsParams, models: ServedModels, drain: Drain) -> ScorePairsResult:
    drain.check()
    return await models.backend_for(params.model).score_pairs(params)


@router.post("/worker_score")
async def score_pairs(params: ScorePairsParams, models: ServedModels = Models, drain: Drain = Draining) -> JSONResponse:
    """A cross-encoder's scores of text pairs (chatgate extension)."""
    return await _answer(lambda: _score(params, models, drain), ScorePairsResult.model_dump)


@router.post("/worker_get_status")
async def status(models: ServedModels = Models, drain: Drain = Draining) -> JSONResponse:
    """Every model's names, speed and queue length (summed), as the controller wants them; 503 while shutting
    down, so the controller's probe confirms that the worker is leaving."""
    if drain.draining:
        return _error_response(drain.refusal())
    return JSONResponse(models.status().model_dump())


@router.post("/count_token")
async def count_token(request: CountTokenRequest, models: ServedModels = Models) -> JSONResponse:
    """Tokens the prompt takes (or an error: a prompt too long to possibly fit is not counted);
    an estimate where `/model_details` says `token_count: estimate`."""
    return await _answer(
        lambda: models.backend_for(request.model).count_tokens(request), lambda count: {"count": count, "error_code": 0}
    )


@router.post("/tokenize")
async def tokenize(params: TokenizeParams, models: ServedModels = Models) -> JSONResponse:
    """Token ids as generation encodes the prompt (the `tokenize` extension)."""
    return await _answer(lambda: models.backend_for(params.model).tokenize(params), lambda r: r.model_dump(exclude_none=True))


@router.post("/detokenize")
async def detokenize(params: DetokenizeParams, models: ServedModels = Models) -> JSONResponse:
    """The text of token ids (the `tokenize` extension)."""
    return await _answer(lambda: models.backend_for(params.model).detokenize(params), lambda r: r.model_dump())


@router.post("/worker_get_conv_template")
async def conv_template(query: ModelQuery | None = None, models: ServedModels = Models) -> JSONResponse:
    """The model's chat template as a FastChat conversation."""
    model = query.model if query else None
    return _answer_now(lambda: models.backend_for(model).conversation(), lambda conv: {"conv": conv.model_dump()})


def _details(backend: WorkerBackend) -> ModelDetails:
    """The backend's details, and the keep-alive frames these routes send."""
    details = backend.details()
    return details.model_copy(update={"chatgate_extensions": [*details.chatgate_extensions, EXT_KEEPALIVE]})


@router.post("/model_details")
async def model_details(query: ModelQuery | None = None, models: ServedModels = Models) -> JSONResponse:
    """Context length and the chatgate extensions the model `model` names supports."""
    model = query.model if query else None
    return _answer_now(lambda: _details(models.backend_for(model)), ModelDetails.model_dump)


async def _admin(work: Awaitable[None], result: AdminResult) -> JSONResponse:
    """`result`, or the error in the OpenAI shape with its own HTTP status (these routes are
    vLLM's, not FastChat's)."""
    try:
        await work
    except ChatgateError as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
    return JSONResponse(result.model_dump())


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(
    params: LoadLoraAdapterRequest, models: ServedModels = Models, drain: Drain = Draining
) -> JSONResponse:
    """Serve a LoRA adapter as a model of its own beside its base (`base_model_name`, needed
    where several models here take adapters); the controller learns it at the next heartbeat."""
    async def load() -> None:
        drain.check()  # a worker shutting down takes no new model
        await models.load_lora(params)

    return await _admin(load(), AdminResult(status="loaded", model=params.lora_name))


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(params: UnloadLoraAdapterRequest, models: ServedModels = Models) -> JSONResponse:
    """Stop serving a LoRA adapter once the requests running through it finish."""
    return await _admin(models.unload_lora(params), AdminResult(status="unloaded", model=params.lora_name))


@router.post("/v1/models/load")
async def load_model(params: ModelRequest, models: ServedModels = Models, drain: Drain = Draining) -> JSONResponse:
    """Load one of this worker's models (by one of its names); the controller learns it at the next heartbeat."""
    async def load() -> None:
        drain.check()
        await models.load_model(params.model)

    return await _admin(load(), AdminResult(status="loaded", model=params.model))


@router.post("/v1/models/unload")
async def unload_model(params: ModelRequest, models: ServedModels = Models) -> JSONResponse:
    """Free one of this worker's models once its running requests finish; its names leave the
    worker's status, and its other models keep serving."""
    return await _admin(models.unload_model(params.model), AdminResult(status="unloaded", model=params.model))
