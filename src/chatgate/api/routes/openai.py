"""OpenAI's routes, and FastChat's and vLLM's extra ones: thin adapters from HTTP to the serving classes."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel

from chatgate.api.serving.models import model_card
from chatgate.api.disconnect import ClientGone, unless_disconnected
from chatgate.api.pieces import is_large, json_in_pieces
from chatgate.api.serving.responses import to_chat
from chatgate.api.sse import named_sse, sse
from chatgate.api.state import ApiState, api_state
from chatgate.errors import ModelNotFoundError
from chatgate.responses import ClosingStreamingResponse
from chatgate.protocol.responses import ResponsesRequest, StreamEvent
from chatgate.protocol.fastchat import TokenCheckRequest, TokenCheckResponse
from chatgate.protocol.vllm import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from chatgate.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)

router = APIRouter()  # the API key is checked in middleware, before the body is read


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Served = BaseModel | AsyncGenerator[BaseModel, None]


def respond(result: Served, request: Request) -> Response:
    """A JSON response, or an SSE stream for a streamed result."""
    write_timeout = api_state(request).stream_write_timeout
    if isinstance(result, EmbeddingResponse) and is_large(result.data):
        return ClosingStreamingResponse(
            json_in_pieces(result, "data"), media_type="application/json", write_timeout=write_timeout
        )
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), media_type="application/json")
    return ClosingStreamingResponse(
        sse(result, str(getattr(request.state, "request_id", ""))),
        media_type="text/event-stream",
        write_timeout=write_timeout,
        headers=_SSE_HEADERS,
    )


def label_model(request: Request, state: ApiState, model: str) -> None:
    """Name the model in this request's metrics, if it is served: the client chooses the name,
    and label values it invents would grow `/metrics` without bound."""
    if model in state.pool.readiness():
        request.state.model = model


@router.get("/v1/models", response_model_exclude_none=True)
async def list_models(state: ApiState = Depends(api_state)) -> ModelList:
    """The models served now."""
    return ModelList(data=[await model_card(state.pool, name) for name in await state.pool.models()])


@router.get("/v1/models/{model:path}", response_model_exclude_none=True)
async def retrieve_model(model: str, state: ApiState = Depends(api_state)) -> ModelCard:
    """One served model."""
    if model not in await state.pool.models():
        raise ModelNotFoundError.for_model(model)
    return await model_card(state.pool, model)


async def answer(request: Request, state: ApiState, model: str, work: Awaitable[Served]) -> Response:
    """Label the request's metrics with `model` (if served), then respond with what serving
    returns; if the client leaves first, the work is cancelled."""
    label_model(request, state, model)
    try:
        return respond(await unless_disconnected(request, work), request)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; nginx's code for a client that left


@router.post("/v1/chat/completions")
@router.post("/api/v1/chat/completions")  # FastChat's path; same request and behaviour
async def chat_completions(body: ChatCompletionRequest, request: Request, state: ApiState = Depends(api_state)) -> Response:
    """Chat completion, streamed or not."""
    return await answer(request, state, body.model, state.chat.create(body))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: ApiState = Depends(api_state)) -> Response:
    """Text completion, streamed or not."""
    return await answer(request, state, body.model, state.completions.create(body))


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request, state: ApiState = Depends(api_state)) -> Response:
    """A model response (the stateless Responses API), streamed as named events or not."""
    label_model(request, state, body.model)
    result = await state.responses.create(to_chat(body))
    if isinstance(result, BaseModel):
        return respond(result, request)
    events: AsyncGenerator[StreamEvent, None] = result
    return ClosingStreamingResponse(
        named_sse(events, str(getattr(request.state, "request_id", ""))),
        media_type="text/event-stream",
        write_timeout=state.stream_write_timeout,
        headers=_SSE_HEADERS,
    )


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request, state: ApiState = Depends(api_state)) -> Response:
    """Embeddings of the inputs."""
    return await answer(request, state, body.model, state.embeddings.create(body))


@router.post("/v1/engines/{model:path}/embeddings", response_model=EmbeddingResponse)
async def engine_embeddings(
    model: str, body: EmbeddingRequest, request: Request, state: ApiState = Depends(api_state)
) -> Response:
    """Embeddings from the model the URL names (the legacy engines path)."""
    return await answer(request, state, model, state.embeddings.create(body.model_copy(update={"model": model})))


@router.post("/api/v1/token_check")
async def token_check(body: TokenCheckRequest, state: ApiState = Depends(api_state)) -> TokenCheckResponse:
    """FastChat's token check: prompt token counts against each model's context."""
    return await state.tokens.check(body)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request, state: ApiState = Depends(api_state)) -> TokenizeResponse:
    """vLLM's tokenize: a prompt's (or a templated conversation's) token ids and count."""
    label_model(request, state, body.model)
    return await state.tokenizer.tokenize(body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request, state: ApiState = Depends(api_state)) -> DetokenizeResponse:
    """vLLM's detokenize: the text of token ids."""
    label_model(request, state, body.model)
    return await state.tokenizer.detokenize(body)
