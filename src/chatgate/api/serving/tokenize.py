"""vLLM's `/tokenize` and `/detokenize`, answered by the model's worker with its own tokenizer,
so a count is exactly what generation would take."""

from __future__ import annotations

from chatgate.api.serving.tools import message_dict
from chatgate.api.workers.base import WorkerPool
from chatgate.api.workers.failover import with_failover
from chatgate.protocol.vllm import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from chatgate.protocol.worker import DetokenizeParams, TokenizeParams


class TokenizeServing:
    """Tokenizes and detokenizes on a worker serving the requested model."""

    def __init__(self, *, pool: WorkerPool) -> None:
        self._pool = pool

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt, or of a conversation rendered as for generation."""
        params = TokenizeParams(
            prompt=request.prompt,
            # The same message dicts a chat request sends the worker, so templates agree.
            messages=[message_dict(m) for m in request.messages] if request.messages is not None else None,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            chat_template_kwargs=request.chat_template_kwargs,
            add_special_tokens=request.special_tokens(),
            return_token_strs=request.return_token_strs,
        )
        result = await with_failover(self._pool, request.model, lambda worker: worker.tokenize(params))
        return TokenizeResponse(
            count=len(result.tokens),
            max_model_len=result.context_length,
            tokens=result.tokens,
            token_strs=result.token_strs,
        )

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids."""
        params = DetokenizeParams(tokens=request.tokens)
        result = await with_failover(self._pool, request.model, lambda worker: worker.detokenize(params))
        return DetokenizeResponse(prompt=result.prompt)
