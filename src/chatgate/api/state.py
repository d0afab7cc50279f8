"""What the API server's routes are handed: serving objects built once in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from chatgate.api.admin import AdminKeys
from chatgate.api.workers.base import WorkerPool
from chatgate.api.serving.model_admin import ModelAdminServing
from chatgate.api.serving.chat import ChatServing
from chatgate.api.serving.completions import CompletionServing
from chatgate.api.serving.embeddings import EmbeddingServing
from chatgate.api.serving.messages import MessagesServing, TokenCountServing
from chatgate.api.serving.responses import ResponsesServing
from chatgate.api.serving.scoring import ScoringServing
from chatgate.api.serving.tokenize import TokenizeServing
from chatgate.api.serving.tokens import TokenCheckServing
from chatgate.api.stored.background import BackgroundJobs
from chatgate.api.stored.store import ResponseStore


@dataclass(frozen=True)
class ApiState:
    """The API server's shared resources."""

    pool: WorkerPool
    admin: AdminKeys
    stream_write_timeout: float
    chat: ChatServing
    completions: CompletionServing
    responses: ResponsesServing
    tokens: TokenCheckServing
    embeddings: EmbeddingServing
    tokenizer: TokenizeServing
    messages: MessagesServing  # Anthropic's /v1/messages
    token_counts: TokenCountServing  # and its /v1/messages/count_tokens
    scoring: ScoringServing  # /v1/rerank and /v1/score
    stored: ResponseStore  # the Responses API's stored responses
    background: BackgroundJobs  # and those run after their reply
    model_admin: ModelAdminServing  # /v1/models/load and unload, /v1/load_lora_adapter and unload


def api_state(request: Request) -> ApiState:
    """The app's state, for route dependencies."""
    state: ApiState = request.app.state.api
    return state

