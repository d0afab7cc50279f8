"""`/v1/completions`: prompts in, text completions (or their stream) out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from chatgate.api.serving.generation import (
    Choice,
    GenerationServing,
    completion_logprobs,
    sampling_params,
    total_usage,
    with_seeds,
)
from chatgate.protocol.openai import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    new_id,
    now,
)
from chatgate.protocol.worker import GenerateParams, WorkerChunk
from chatgate.streams import merge


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
        "logprobs": request.logprobs,
        "prompt_param": "prompt",
    }
    params: list[GenerateParams] = []
    for prompt in prompts_of(request):
        single = GenerateParams.model_validate({**common, **prompt})
        params.extend(with_seeds(single, request.n, request.seed))
    return params


class CompletionServing(GenerationServing):
    """Serves text completions, streamed or not."""

    async def create(
        self, request: CompletionRequest
    ) -> CompletionResponse | AsyncIterator[CompletionResponse]:
        """Answer a completion request: a response, or a stream of chunks."""
        self.check_n(request.n)
        streams = await self.start(request.model, to_params(request))
        response_id, created = new_id("cmpl"), now()
        if request.stream:
            return self._stream(streams, request, response_id, created, request.include_usage())
        choices = await self.collect(streams)
        return CompletionResponse(
            id=response_id,
            created=created,
            model=request.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text=c.text,
                    finish_reason=c.finish_reason,  # type: ignore[arg-type]
                    logprobs=completion_logprobs(c.logprobs, 0, c.prompt_logprobs) if request.logprobs is not None else None,
                )
                for i, c in enumerate(choices)
            ],
            usage=total_usage(choices, request.n),
        )

    async def _stream(
        self,
        streams: list[AsyncGenerator[WorkerChunk, None]],
        request: CompletionRequest,
        response_id: str,
        created: int,
        include_usage: bool,
    ) -> AsyncIterator[CompletionResponse]:
        choices = [Choice() for _ in streams]
        async with contextlib.aclosing(merge(streams)) as merged:
            async for index, part in merged:
                offset = len(choices[index].text)
                choices[index].add(part)
                if part.text or part.finish_reason:
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = completion_logprobs(part.token_logprobs or [], offset, part.prompt_logprobs)
                    choice = CompletionChoice(
                        index=index, text=part.text, finish_reason=part.finish_reason, logprobs=logprobs  # type: ignore[arg-type]
                    )
                    yield CompletionResponse(id=response_id, created=created, model=request.model, choices=[choice])
        if include_usage:
            yield CompletionResponse(
                id=response_id,
                created=created,
                model=request.model,
                choices=[],
                usage=total_usage(choices, request.n),
            )
