"""`/v1/chat/completions`: conversation in, assistant message (or its stream) out."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
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
    Usage,
    new_id,
    now,
)
from chatgate.api.serving.tools import ToolPlan, native_tools, plan, render_messages
from chatgate.protocol.worker import GenerateParams, WorkerChunk
from chatgate.streams import merge


def to_params(request: ChatCompletionRequest, tool_plan: ToolPlan | None = None) -> GenerateParams:
    """Worker parameters for a chat request; the worker applies the model's chat template."""
    constraint = tool_plan.constraint() if tool_plan else None
    if constraint is None and request.response_format is not None:
        constraint = request.response_format.constraint()
    return GenerateParams.model_validate(
        {
            **sampling_params(request),
            "messages": render_messages(request, tool_plan),
            **native_tools(request, tool_plan),
            "max_new_tokens": request.completion_limit(),
            "response_format": constraint,
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
        tool_plan = plan(request)
        params = with_seeds(to_params(request, tool_plan), request.n, request.seed)
        streams = await self.start(request.model, params)
        response_id, created = new_id("chatcmpl"), now()
        if request.stream:
            if tool_plan is not None:
                return self._tool_stream(streams, request, tool_plan, response_id, created)
            return self._stream(streams, request, response_id, created, request.include_usage())
        choices = await self.collect(streams)
        return ChatCompletionResponse(
            id=response_id,
            created=created,
            model=request.model,
            choices=[_choice(i, c, bool(request.logprobs), tool_plan) for i, c in enumerate(choices)],
            usage=total_usage(choices, request.n),
        )

    async def _tool_stream(
        self,
        streams: list[AsyncGenerator[WorkerChunk, None]],
        request: ChatCompletionRequest,
        tool_plan: ToolPlan,
        response_id: str,
        created: int,
    ) -> AsyncIterator[ChatCompletionChunk]:
        """With tools, a reply is known to be calls or text only once it is complete: each
        choice is sent when it ends, calls as OpenAI streams them (id and name, then arguments)."""

        chunk = _Chunks(response_id, created, request.model)
        choices = [Choice() for _ in streams]
        for index in range(len(streams)):
            yield chunk(index, ChatDelta(role="assistant", content=""))
        async with contextlib.aclosing(merge(streams)) as merged:
            async for index, part in merged:
                choices[index].add(part)
                if not part.finish_reason:
                    continue
                done = _choice(index, choices[index], False, tool_plan)
                message = done.message
                if message.tool_calls:
                    for i, call in enumerate(message.tool_calls):
                        head = {"index": i, "id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": ""}}
                        yield chunk(index, ChatDelta(tool_calls=[head]))
                        yield chunk(index, ChatDelta(tool_calls=[{"index": i, "function": {"arguments": call.function.arguments}}]))
                elif message.function_call:
                    yield chunk(index, ChatDelta(function_call={"name": message.function_call.name, "arguments": ""}))
                    yield chunk(index, ChatDelta(function_call={"arguments": message.function_call.arguments}))
                elif message.content:
                    yield chunk(index, ChatDelta(content=message.content))
                yield chunk(index, ChatDelta(), done.finish_reason)
        if request.include_usage():
            yield chunk.usage(total_usage(choices, request.n))

    async def _stream(
        self,
        streams: list[AsyncGenerator[WorkerChunk, None]],
        request: ChatCompletionRequest,
        response_id: str,
        created: int,
        include_usage: bool,
    ) -> AsyncIterator[ChatCompletionChunk]:
        chunk = _Chunks(response_id, created, request.model)
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
            yield chunk.usage(total_usage(choices, request.n))


@dataclass(frozen=True)
class _Chunks:
    """Builds the chunks of one streamed response."""

    response_id: str
    created: int
    model: str

    def __call__(
        self, index: int, delta: ChatDelta, finish: str | None = None, logprobs: ChatLogprobs | None = None
    ) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
        return ChatCompletionChunk(id=self.response_id, created=self.created, model=self.model, choices=[choice])

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        """The final chunk carrying usage, with no choices."""
        return ChatCompletionChunk(id=self.response_id, created=self.created, model=self.model, choices=[], usage=usage)


def _choice(index: int, choice: Choice, with_logprobs: bool, tool_plan: ToolPlan | None = None) -> ChatChoice:
    calls = tool_plan.parse(choice.text) if tool_plan is not None and choice.finish_reason == "stop" else None
    message = AssistantMessage(content=choice.text)
    finish = choice.finish_reason
    if calls and tool_plan is not None and tool_plan.legacy:
        message, finish = AssistantMessage(content=None, function_call=calls[0].function), "function_call"
    elif calls:
        message, finish = AssistantMessage(content=None, tool_calls=calls), "tool_calls"
    return ChatChoice(
        index=index,
        message=message,
        finish_reason=finish,  # type: ignore[arg-type]
        logprobs=chat_logprobs(choice.logprobs) if with_logprobs else None,
    )
