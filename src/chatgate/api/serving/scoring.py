"""`/v1/rerank` and `/v1/score` on an embedding model, as a bi-encoder: every text is embedded by
the model's worker (the same call `/v1/embeddings` makes, with its caps) and a pair's score is
the cosine similarity of its two vectors. No cross-encoder (sequence-classification) model is
packaged to serve; one would score each pair jointly instead.
"""

from __future__ import annotations

import uuid

import numpy as np

from chatgate.api.limits import grant as limits
from chatgate.api.workers.base import Worker, WorkerPool
from chatgate.api.workers.failover import with_failover
from chatgate.errors import ChatgateError, InvalidRequestError
from chatgate.protocol.scoring import (
    DocumentText,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    ScoreUsage,
)
from chatgate.protocol.worker import EmbedParams


async def _embed(worker: Worker, model: str, groups: dict[str, list[str]]) -> tuple[list[np.ndarray], int]:
    """Unit vectors of each group of texts, by the field that holds it (one worker call per
    group, so each stays within the embedding cap), and the tokens read. A text the worker
    refuses (longer than the model reads) is an error naming its field."""
    if not (await worker.model_details()).embedding_dim:
        raise InvalidRequestError(f"The model `{model}` does not make embeddings, so it cannot score texts.", param="model")
    vectors, tokens = [], 0
    for field, texts in groups.items():
        try:
            result = await worker.embed(EmbedParams(model=model, input=texts))
        except ChatgateError as exc:
            exc.param = field if exc.param == "input" else exc.param
            raise
        matrix = np.asarray(result.embedding, dtype=np.float64)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        vectors.append(matrix / np.where(norms == 0, 1.0, norms))  # a zero vector scores 0
        tokens += result.token_num
    return vectors, tokens


class ScoringServing:
    """Reranks documents and scores text pairs on the requested embedding model's worker."""

    def __init__(self, *, pool: WorkerPool) -> None:
        self._pool = pool

    async def _vectors(self, model: str, groups: dict[str, list[str]]) -> tuple[list[np.ndarray], int]:
        vectors, tokens = await with_failover(self._pool, model, lambda worker: _embed(worker, model, groups))
        await limits.charge(tokens)  # read tokens count against the key's tpm, as embeddings' do
        return vectors, tokens

    async def rerank(self, request: RerankRequest) -> RerankResponse:
        """The documents by relevance to the query, highest first; ties keep request order."""
        texts = request.texts()
        (query, documents), tokens = await self._vectors(request.model, {"query": [request.query], "documents": texts})
        scores = documents @ query[0]
        order = sorted(range(len(texts)), key=lambda i: -float(scores[i]))  # sorted() is stable
        keep = order[: request.top_n] if request.top_n else order
        results = [
            RerankResult(
                index=i,
                relevance_score=float(scores[i]),
                document=DocumentText(text=texts[i]) if request.return_documents else None,
            )
            for i in keep
        ]
        return RerankResponse(
            id=f"rerank-{uuid.uuid4().hex}", model=request.model, results=results, usage=RerankUsage(total_tokens=tokens)
        )

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        """Each pair's score, in pair order (`text_1` repeated when it is one text)."""
        firsts, seconds = request.lists()
        (left, right), tokens = await self._vectors(request.model, {"text_1": firsts, "text_2": seconds})
        if len(firsts) == 1:
            left = np.repeat(left, len(seconds), axis=0)
        scores = np.sum(left * right, axis=1)
        return ScoreResponse(
            id=f"score-{uuid.uuid4().hex}",
            model=request.model,
            data=[ScoreData(index=i, score=float(s)) for i, s in enumerate(scores)],
            usage=ScoreUsage(prompt_tokens=tokens, total_tokens=tokens),
        )
