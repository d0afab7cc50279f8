"""`/v1/chat/completions`: conversation in, assistant message (or its stream) out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from chatgate.api.serving.generation import (
    Choice,
    GenerationServing,
    chat_logprobs,
    sampling_params,
    total_usage,
    with_seeds,
)
from chatgate.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    new_id,
    now,
)
from chatgate.protocol.worker import GenerateParams, WorkerChunk
from chatgate.streams import merge


def to_params(request: ChatCompletionRequest) -> GenerateParams:
    """Worker parameters for a chat request; the worker applies the model's chat template."""
    messages = [
        {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
        for m in request.messages
    ]
    return GenerateParams.model_validate(
        {
            **sampling_params(request),
            "messages": messages,
            "max_new_tokens": request.completion_limit(),
            "response_format": request.response_format.constraint() if request.response_format else None,
            "logprobs": request.logprob_count(),
            "prompt_param": "messages",
            "max_tokens_param": "max_completion_tokens"
            if request.max_completion_tokens is not None
            else "max_tokens",
        }
    )


class ChatServing(GenerationServing):
    """Serves chat completions, streamed or not."""

    async def create(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[ChatCompletionChunk]:
        """Answer a chat request: a response, or a stream of chunks."""
        self.check_n(request.n)
        params = with_seeds(to_params(request), request.n, request.seed)
        streams = await self.start(request.model, params)
        response_id, created = new_id("chatcmpl"), now()
        if request.stream:
            return self._stream(streams, request, response_id, created, request.include_usage())
        choices = await self.collect(streams)
        return ChatCompletionResponse(
            id=response_id,
            created=created,
            model=request.model,
            choices=[_choice(i, c, bool(request.logprobs)) for i, c in enumerate(choices)],
            usage=total_usage(choices, request.n),
        )

    async def _stream(
        self,
        streams: list[AsyncGenerator[WorkerChunk, None]],
        request: ChatCompletionRequest,
        response_id: str,
        created: int,
        include_usage: bool,
    ) -> AsyncIterator[ChatCompletionChunk]:
        def chunk(
            index: int, delta: ChatDelta, finish: str | None = None, logprobs: ChatLogprobs | None = None
        ) -> ChatCompletionChunk:
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
            return ChatCompletionChunk(id=response_id, created=created, model=request.model, choices=[choice])

        choices = [Choice() for _ in streams]
        for index in range(len(streams)):
            yield chunk(index, ChatDelta(role="assistant", content=""))
        async with contextlib.aclosing(merge(streams)) as merged:
            async for index, part in merged:
                choices[index].add(part)
                if part.text:
                    logprobs = chat_logprobs(part.token_logprobs or []) if request.logprobs else None
                    yield chunk(index, ChatDelta(content=part.text), logprobs=logprobs)
                if part.finish_reason:
                    yield chunk(index, ChatDelta(), part.finish_reason)
        if include_usage:
            yield ChatCompletionChunk(
                id=response_id,
                created=created,
                model=request.model,
                choices=[],
                usage=total_usage(choices, request.n),
            )


def _choice(index: int, choice: Choice, with_logprobs: bool) -> ChatChoice:
    return ChatChoice(
        index=index,
        message=AssistantMessage(content=choice.text),
        finish_reason=choice.finish_reason,  # type: ignore[arg-type]
        logprobs=chat_logprobs(choice.logprobs) if with_logprobs else None,
    )
