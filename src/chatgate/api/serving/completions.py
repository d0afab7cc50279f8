"""`/v1/completions`: prompts in, text completions (or their stream) out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from chatgate.api.serving.generation import (
    Choice,
    GenerationServing,
    Reply,
    completion_logprobs,
    sampling_params,
    with_seeds,
)
from chatgate.protocol.openai import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
    now,
)
from chatgate.protocol.worker import GenerateParams, WorkerChunk


def prompts_of(request: CompletionRequest) -> list[dict[str, object]]:
    """Each prompt of the request as worker fields: text, or token ids."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": prompt}]
    return [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]


def to_params(request: CompletionRequest) -> list[GenerateParams]:
    """Worker parameters for every (prompt, choice) pair, prompts outermost."""
    common = {
        **sampling_params(request),
        "max_new_tokens": request.max_tokens,
        "echo": bool(request.echo),
        "suffix": request.suffix,
        "logprobs": request.logprobs,
        "response_format": request.constraint(),
        "prompt_param": "prompt",
    }
    params: list[GenerateParams] = []
    for prompt in prompts_of(request):
        single = GenerateParams.model_validate({**common, **prompt})
        params.extend(with_seeds(single, request.n, request.seed))
    return params


@dataclass
class CompletionReply(Reply[CompletionResponse, CompletionResponse]):
    """Builds a completion response, or its chunks (which have the response's own shape)."""

    request: CompletionRequest
    id: str = field(default_factory=lambda: new_id("cmpl"))
    created: int = field(default_factory=now)

    def _response(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.request.model, choices=choices, usage=usage
        )

    def chunks(self, index: int, part: WorkerChunk, choice: Choice, sent: int) -> Iterable[CompletionResponse]:
        if not (part.text or part.finish_reason):
            return
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = completion_logprobs(part.token_logprobs or [], sent, part.prompt_logprobs)
        yield self._response(
            [CompletionChoice(index=index, text=part.text, finish_reason=part.finish_reason, logprobs=logprobs)]
        )

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return self._response([], usage)

    def response(self, choices: list[Choice], usage: Usage) -> CompletionResponse:
        with_logprobs = self.request.logprobs is not None
        return self._response(
            [
                CompletionChoice(
                    index=i,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    logprobs=completion_logprobs(c.logprobs, 0, c.prompt_logprobs) if with_logprobs else None,
                )
                for i, c in enumerate(choices)
            ],
            usage,
        )


class CompletionServing(GenerationServing[CompletionRequest, CompletionResponse, CompletionResponse]):
    """Serves text completions, streamed or not."""

    def prepare(self, request: CompletionRequest) -> tuple[list[GenerateParams], CompletionReply]:
        return to_params(request), CompletionReply(request)
