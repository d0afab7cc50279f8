"""FastChat's `/api/v1/token_check`: does a prompt plus its completion fit the model?"""

from __future__ import annotations

from chatgate.api.clients import Router
from chatgate.protocol.fastchat import TokenCheckRequest, TokenCheckResponse, TokenCheckResult
from chatgate.protocol.worker import CountTokenRequest


class TokenCheckServing:
    """Counts prompt tokens with each model's own tokenizer."""

    def __init__(self, *, router: Router) -> None:
        self._router = router

    async def check(self, request: TokenCheckRequest) -> TokenCheckResponse:
        """One result per prompt, in order."""
        results = []
        for item in request.prompts:
            worker = await self._router.worker_for(item.model)
            count = await worker.count_tokens(CountTokenRequest(prompt=item.prompt))
            context = (await worker.model_details()).context_length
            results.append(
                TokenCheckResult(
                    fits=count + item.max_tokens <= context, tokenCount=count, contextLength=context
                )
            )
        return TokenCheckResponse(prompts=results)
