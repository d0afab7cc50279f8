"""Anthropic's Messages routes: thin adapters from HTTP to the serving classes. Every one is an
`AnthropicDoor`: the same door as OpenAI's routes (identity from `x-api-key` or `Authorization`,
limits, validation, cost caps, disconnects, charging), with its errors said in Anthropic's shape."""

from __future__ import annotations

from fastapi import APIRouter, Request

from chatgate.api.door import Door, NamedEvents, Served
from chatgate.api.errors import ANTHROPIC
from chatgate.api.serving.messages import to_chat
from chatgate.api.state import api_state
from chatgate.protocol.anthropic import AnthropicErrorResponse, CountTokensRequest, MessageResponse, MessagesRequest, TokenCount


class AnthropicDoor(Door):
    """The door, speaking Anthropic's errors."""

    error_dialect = ANTHROPIC
    error_model = AnthropicErrorResponse


router = APIRouter(route_class=AnthropicDoor)


@router.post("/v1/messages", response_model=MessageResponse, response_model_exclude_none=True)
async def messages(body: MessagesRequest, request: Request) -> Served:
    """A model's reply to a conversation, streamed as Anthropic's named events or not."""
    result = await api_state(request).messages.create(to_chat(body))
    return result if isinstance(result, MessageResponse) else NamedEvents(result)


@router.post("/v1/messages/count_tokens", response_model=TokenCount)
async def count_tokens(body: CountTokensRequest, request: Request) -> Served:
    """The input tokens a conversation would take, with the model's own tokenizer and template."""
    return await api_state(request).token_counts.count(body)
