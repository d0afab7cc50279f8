"""`/v1/rerank` and `/v1/score`, on either kind of model a worker serves:
- a cross-encoder (a sequence-classification model) reads each pair together and scores it (the
  worker's `/worker_score`): the more exact kind, as rerankers are;
- an embedding model, as a bi-encoder: every text is embedded by the model's worker (the same
  call `/v1/embeddings` makes, with its caps) and a pair's score is the cosine similarity of its
  two vectors.
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
from chatgate.protocol.worker import EmbedParams, ScorePairsParams


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


async def _score_pairs(worker: Worker, model: str, pairs: list[tuple[str, str]], names: tuple[str, str]) -> tuple[np.ndarray, int] | None:
    """A cross-encoder's scores of `pairs` and the tokens it read; None when the model is not
    one (it is scored by embedding). A pair too long for the model is an error naming the
    request's field of its second text (`names`: the fields of the first and second texts)."""
    if not (await worker.model_details()).cross_encoder:
        return None
    try:
        result = await worker.score_pairs(ScorePairsParams(model=model, pairs=pairs))
    except ChatgateError as exc:
        if exc.param and exc.param.startswith("pairs["):
            exc.param = names[1] + exc.param[len("pairs"):]
        raise
    return np.asarray(result.scores, dtype=np.float64), result.token_num


class ScoringServing:
    """Reranks documents and scores text pairs on the requested embedding model's worker."""

    def __init__(self, *, pool: WorkerPool) -> None:
        self._pool = pool

    async def _vectors(self, model: str, groups: dict[str, list[str]]) -> tuple[list[np.ndarray], int]:
        vectors, tokens = await with_failover(self._pool, model, lambda worker: _embed(worker, model, groups))
        await limits.charge(tokens)  # read tokens count against the key's tpm, as embeddings' do
        return vectors, tokens

    async def _pairs(self, model: str, pairs: list[tuple[str, str]], names: tuple[str, str]) -> tuple[np.ndarray, int] | None:
        scored = await with_failover(self._pool, model, lambda worker: _score_pairs(worker, model, pairs, names))
        if scored is not None:
            await limits.charge(scored[1])
        return scored

    async def rerank(self, request: RerankRequest) -> RerankResponse:
        """The documents by relevance to the query, highest first; ties keep request order."""
        texts = request.texts()
        jointly = await self._pairs(request.model, [(request.query, text) for text in texts], ("query", "documents"))
        if jointly is not None:
            scores, tokens = jointly
        else:
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
        pairs = list(zip(firsts * len(seconds) if len(firsts) == 1 else firsts, seconds, strict=True))
        jointly = await self._pairs(request.model, pairs, ("text_1", "text_2"))
        if jointly is not None:
            scores, tokens = jointly
        else:
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
