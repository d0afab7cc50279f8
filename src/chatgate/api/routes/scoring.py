"""Reranking and scoring routes, as vLLM serves them (Cohere's and Jina's `rerank` at every path
they use, vLLM's `score`): thin adapters over `ScoringServing`, each a `Door`."""

from __future__ import annotations

from fastapi import APIRouter, Request

from chatgate.api.door import Door, Served
from chatgate.api.state import api_state
from chatgate.protocol.scoring import RerankRequest, RerankResponse, ScoreRequest, ScoreResponse

router = APIRouter(route_class=Door)


@router.post("/v1/rerank", response_model=RerankResponse)
@router.post("/v2/rerank", response_model=RerankResponse)  # Cohere's v2 path
@router.post("/rerank", response_model=RerankResponse)  # llama.cpp's and Jina's
async def rerank(body: RerankRequest, request: Request) -> Served:
    """The documents ordered by relevance to the query."""
    return await api_state(request).scoring.rerank(body)


@router.post("/v1/score", response_model=ScoreResponse)
@router.post("/score", response_model=ScoreResponse)  # vLLM's path without the version
async def score(body: ScoreRequest, request: Request) -> Served:
    """Scores of text pairs, one to one or one to many."""
    return await api_state(request).scoring.score(body)
