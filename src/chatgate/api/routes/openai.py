"""OpenAI's routes, and FastChat's and vLLM's extra ones: thin adapters from HTTP to the serving
classes. Every one is a `Door`: identity, limits, validation, cost caps, disconnects and charging
are the door's (`chatgate.api.door`), not the route's."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from chatgate.api.door import Door, NamedEvents, Served
from chatgate.api.serving.models import model_card
from chatgate.api.serving.responses import to_chat
from chatgate.api.stored.store import mark, owner
from chatgate.api.state import api_state
from chatgate.errors import ModelNotFoundError
from chatgate.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from chatgate.protocol.fastchat import TokenCheckRequest, TokenCheckResponse
from chatgate.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from chatgate.protocol.responses import (
    DeletedResponse, InputItemList, InputItemsQuery, ResponseObject, ResponsesRequest, RetrieveQuery,
)
from chatgate.protocol.vllm import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter(route_class=Door)


@router.get("/v1/models", response_model=ModelList, response_model_exclude_none=True)
async def list_models(request: Request) -> Served:
    """The models served now."""
    pool = api_state(request).pool
    return ModelList(data=[await model_card(pool, name) for name in await pool.models()])


@router.get("/v1/models/{model:path}", response_model=ModelCard, response_model_exclude_none=True)
async def retrieve_model(model: str, request: Request) -> Served:
    """One served model."""
    pool = api_state(request).pool
    if model not in await pool.models():
        raise ModelNotFoundError.for_model(model)
    return await model_card(pool, model)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
@router.post("/api/v1/chat/completions", response_model=ChatCompletionResponse)  # FastChat's path
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Served:
    """Chat completion, streamed or not."""
    return await api_state(request).chat.create(body)


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request) -> Served:
    """Text completion, streamed or not."""
    return await api_state(request).completions.create(body)


@router.post("/v1/responses", response_model=ResponseObject)
async def responses(body: ResponsesRequest, request: Request) -> Served:
    """A model response, streamed as named events or not, or run in the background; kept
    unless `store` is false, and continuing the stored response `previous_response_id` names."""
    state, who = api_state(request), owner()
    whole, earlier = await state.stored.continued(body, who)
    if body.background:
        queued = await state.background.start(body, whole, earlier, who)
        return NamedEvents(await state.stored.replay(queued.id, who, None)) if body.stream else queued
    result = await state.responses.create(to_chat(whole))
    if not isinstance(result, ResponseObject):
        return NamedEvents(state.stored.keeping(body, result, earlier, who))
    result = mark(result, body)
    if body.store is not False:
        await state.stored.keep(body, result, earlier, who)
    return result


@router.get("/v1/responses/{response_id}", response_model=ResponseObject)
async def retrieve_response(response_id: str, query: Annotated[RetrieveQuery, Query()], request: Request) -> Served:
    """A stored response of the caller's key, or (`stream=true`) its events replayed after
    `starting_after`, followed to its end while it runs."""
    stored = api_state(request).stored
    if query.stream:
        return NamedEvents(await stored.replay(response_id, owner(), query.starting_after))
    return (await stored.get(response_id, owner())).response


@router.get("/v1/responses/{response_id}/input_items", response_model=InputItemList)
async def response_input_items(response_id: str, query: Annotated[InputItemsQuery, Query()], request: Request) -> Served:
    """A page of the input items of a stored response of the caller's key (newest first by default)."""
    return query.page((await api_state(request).stored.get(response_id, owner())).input_items)


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse)
async def delete_response(response_id: str, request: Request) -> Served:
    """Forget a stored response of the caller's key."""
    await api_state(request).stored.delete(response_id, owner())
    return DeletedResponse(id=response_id)


@router.post("/v1/responses/{response_id}/cancel", response_model=ResponseObject)
async def cancel_response(response_id: str, request: Request) -> Served:
    """Stop a background response of the caller's key (kept as `cancelled`)."""
    return await api_state(request).background.cancel(response_id, owner())


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request) -> Served:
    """Embeddings of the inputs."""
    return await api_state(request).embeddings.create(body)


@router.post("/v1/engines/{model:path}/embeddings", response_model=EmbeddingResponse)
async def engine_embeddings(model: str, body: EmbeddingRequest, request: Request) -> Served:
    """Embeddings from the model the URL names (the legacy engines path)."""
    return await api_state(request).embeddings.create(body.model_copy(update={"model": model}))


@router.post("/api/v1/token_check", response_model=TokenCheckResponse)
async def token_check(body: TokenCheckRequest, request: Request) -> Served:
    """FastChat's token check: prompt token counts against each model's context."""
    return await api_state(request).tokens.check(body)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> Served:
    """vLLM's tokenize: a prompt's (or a templated conversation's) token ids and count."""
    return await api_state(request).tokenizer.tokenize(body)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> Served:
    """vLLM's detokenize: the text of token ids."""
    return await api_state(request).tokenizer.detokenize(body)
