"""`/v1/embeddings`: inputs in, one vector per input out, in input order."""

from __future__ import annotations

import base64

import numpy as np

from chatgate import tracing
from chatgate.api.limits import grant as limits
from chatgate.api.workers.base import Worker, WorkerPool
from chatgate.api.workers.failover import with_failover
from chatgate.errors import InvalidRequestError
from chatgate.protocol.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from chatgate.protocol.worker import EmbedParams, EmbedResult


def to_params(request: EmbeddingRequest) -> EmbedParams:
    """Worker parameters: texts, or token-id lists for the worker's own tokenizer."""
    value = request.input
    if isinstance(value, str):
        return EmbedParams(model=request.model, input=[value])
    texts = [item for item in value if isinstance(item, str)]
    if len(texts) == len(value):
        return EmbedParams(model=request.model, input=texts)
    ids = [item for item in value if isinstance(item, int)]
    if len(ids) == len(value):
        return EmbedParams(model=request.model, input_token_ids=[ids])
    return EmbedParams(model=request.model, input_token_ids=[item for item in value if isinstance(item, list)])


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def _checked_embed(worker: Worker, request: EmbeddingRequest) -> EmbedResult:
    details = await worker.model_details()
    if request.dimensions is not None and request.dimensions != details.embedding_dim:
        raise InvalidRequestError(
            f"This model's embeddings have {details.embedding_dim} dimensions and cannot be "
            f"shortened; 'dimensions' must be {details.embedding_dim} or left out.",
            param="dimensions",
        )
    return await worker.embed(to_params(request))


class EmbeddingServing:
    """Serves embeddings from the worker of the requested model."""

    def __init__(self, *, pool: WorkerPool) -> None:
        self._pool = pool

    async def create(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """Embed every input of the request."""
        if not request.model:
            raise InvalidRequestError("Missing required parameter: 'model'.", param="model",
                                      code="missing_required_parameter")
        tracing.request_attributes({"gen_ai.operation.name": "embeddings", "gen_ai.request.model": request.model})
        result = await with_failover(self._pool, request.model, lambda w: _checked_embed(w, request))
        tracing.request_usage(input_tokens=result.token_num, output_tokens=0, finish_reason=None)
        await limits.charge(result.token_num)  # input tokens count against the key's tpm, as chat's do
        # The vectors were validated as the worker result: not again, per float, on the loop.
        return EmbeddingResponse(
            data=[
                Embedding.model_construct(embedding=encode(vector, request.encoding_format), index=index)
                for index, vector in enumerate(result.embedding)
            ],
            model=request.model,
            usage=EmbeddingUsage(prompt_tokens=result.token_num, total_tokens=result.token_num),
        )
