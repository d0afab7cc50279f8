"""`/v1/chat/completions`: conversation in, assistant message (or its stream) out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from chatgate.api.serving.generation import (
    Choice,
    GenerationServing,
    Reply,
    chat_logprobs,
    sampling_params,
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
    FinishReason,
    Usage,
    new_id,
    now,
)
from chatgate.api.serving.tools import ToolPlan, native_tools, plan, render_messages
from chatgate.protocol.worker import GenerateParams, WorkerChunk


def to_params(request: ChatCompletionRequest, tool_plan: ToolPlan | None = None) -> GenerateParams:
    """Worker parameters for a chat request; the worker applies the model's chat template."""
    constraint = tool_plan.constraint() if tool_plan else None
    if constraint is None and request.response_format is not None:
        constraint = request.response_format.constraint()
    constraint = constraint or request.structured_constraint()
    return GenerateParams.model_validate(
        {
            **sampling_params(request),
            "messages": render_messages(request, tool_plan),
            **native_tools(request, tool_plan),
            "max_new_tokens": request.completion_limit(),
            "response_format": constraint,
            "logprobs": request.logprob_count(),
            "prompt_param": "messages",
            **templating(request),
            "max_tokens_param": "max_completion_tokens"
            if request.max_completion_tokens is not None
            else "max_tokens",
        }
    )


def templating(request: ChatCompletionRequest) -> dict[str, object]:
    """The worker fields of a request's chat templating and reasoning effort, where set."""
    fields = {
        "chat_template_kwargs": request.chat_template_kwargs,
        "reasoning_effort": request.reasoning_effort,
        "add_generation_prompt": request.add_generation_prompt,
        "continue_final_message": request.continue_final_message,
    }
    return {k: v for k, v in fields.items() if v is not None}


@dataclass
class ChatReply(Reply[ChatCompletionResponse, ChatCompletionChunk]):
    """Builds a chat response, or its chunks: text as it comes, or, with tools, each choice
    when it ends (a reply is known to be calls or text only once it is complete)."""

    request: ChatCompletionRequest
    tool_plan: ToolPlan | None
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=now)

    def _chunk(
        self, index: int, delta: ChatDelta, finish: FinishReason = None, logprobs: ChatLogprobs | None = None
    ) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.request.model, choices=[choice])

    def opening(self, choices: int) -> Iterable[ChatCompletionChunk]:
        return [self._chunk(index, ChatDelta(role="assistant", content="")) for index in range(choices)]

    def chunks(self, index: int, part: WorkerChunk, choice: Choice, sent: int) -> Iterable[ChatCompletionChunk]:
        if part.reasoning_content:  # thinking is never a call: it streams as it comes, tools or not
            yield self._chunk(index, ChatDelta(reasoning_content=part.reasoning_content))
        if self.tool_plan is not None:
            if part.finish_reason:
                yield from self._finished_with_tools(index, choice)
            return
        if part.text:
            logprobs = chat_logprobs(part.token_logprobs or []) if self.request.logprobs else None
            yield self._chunk(index, ChatDelta(content=part.text), logprobs=logprobs)
        if part.finish_reason:
            yield self._chunk(index, ChatDelta(), part.finish_reason)

    def _finished_with_tools(self, index: int, choice: Choice) -> Iterable[ChatCompletionChunk]:
        """A complete choice, calls streamed as OpenAI streams them (id and name, then arguments)."""
        done = _choice(index, choice, False, self.tool_plan)
        message = done.message
        if message.tool_calls:
            for i, call in enumerate(message.tool_calls):
                head = {"index": i, "id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": ""}}
                yield self._chunk(index, ChatDelta(tool_calls=[head]))
                yield self._chunk(index, ChatDelta(tool_calls=[{"index": i, "function": {"arguments": call.function.arguments}}]))
        elif message.function_call:
            yield self._chunk(index, ChatDelta(function_call={"name": message.function_call.name, "arguments": ""}))
            yield self._chunk(index, ChatDelta(function_call={"arguments": message.function_call.arguments}))
        elif message.content:
            yield self._chunk(index, ChatDelta(content=message.content))
        yield self._chunk(index, ChatDelta(), done.finish_reason)

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.request.model, choices=[], usage=usage)

    def response(self, choices: list[Choice], usage: Usage) -> ChatCompletionResponse:
        with_logprobs = bool(self.request.logprobs)
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.request.model,
            choices=[_choice(i, c, with_logprobs, self.tool_plan) for i, c in enumerate(choices)],
            usage=usage,
        )


class ChatServing(GenerationServing[ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk]):
    """Serves chat completions, streamed or not."""

    def prepare(self, request: ChatCompletionRequest) -> tuple[list[GenerateParams], ChatReply]:
        tool_plan = plan(request)
        params = with_seeds(to_params(request, tool_plan), request.n, request.seed)
        return params, ChatReply(request, tool_plan)


def _choice(index: int, choice: Choice, with_logprobs: bool, tool_plan: ToolPlan | None = None) -> ChatChoice:
    calls = tool_plan.parse(choice.text) if tool_plan is not None and choice.finish_reason == "stop" else None
    reasoning = choice.reasoning or None
    message = AssistantMessage(content=choice.text, reasoning_content=reasoning)
    finish = choice.finish_reason
    if calls and tool_plan is not None and tool_plan.legacy:
        message, finish = AssistantMessage(content=None, reasoning_content=reasoning, function_call=calls[0].function), "function_call"
    elif calls:
        message, finish = AssistantMessage(content=None, reasoning_content=reasoning, tool_calls=calls), "tool_calls"
    return ChatChoice(
        index=index,
        message=message,
        finish_reason=finish,
        logprobs=chat_logprobs(choice.logprobs) if with_logprobs else None,
    )
