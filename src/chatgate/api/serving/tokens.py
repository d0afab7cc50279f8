"""FastChat's `/api/v1/token_check`: does a prompt plus its completion fit the model?"""

from __future__ import annotations

from chatgate.api.workers.base import Worker, WorkerPool
from chatgate.api.workers.failover import with_failover
from chatgate.protocol.fastchat import TokenCheckRequest, TokenCheckResponse, TokenCheckResult
from chatgate.protocol.worker import CountTokenRequest


class TokenCheckServing:
    """Counts prompt tokens with each model's own tokenizer."""

    def __init__(self, *, pool: WorkerPool) -> None:
        self._pool = pool

    async def check(self, request: TokenCheckRequest) -> TokenCheckResponse:
        """One result per prompt, in order."""
        results = []
        for item in request.prompts:
            count, context = await with_failover(self._pool, item.model, lambda w: _measure(w, item.prompt))
            results.append(
                TokenCheckResult(
                    fits=count + item.max_tokens <= context, tokenCount=count, contextLength=context
                )
            )
        return TokenCheckResponse(prompts=results)


async def _measure(worker: Worker, prompt: str) -> tuple[int, int]:
    """Prompt tokens and context length, from the worker's own tokenizer."""
    count = await worker.count_tokens(CountTokenRequest(prompt=prompt))
    return count, (await worker.model_details()).context_length
