"""Anthropic's `/v1/messages` and `/v1/messages/count_tokens`: a Messages request becomes a chat
request, so the chat template, tool plan and constraints are chat's; its result becomes a
`message` object or Anthropic's named stream events.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from chatgate.api.serving.chat import to_params
from chatgate.api.serving.generation import Choice, GenerationServing, Reply
from chatgate.api.serving.tools import ToolPlan, plan, render_messages
from chatgate.api.workers.base import WorkerPool
from chatgate.api.workers.failover import with_failover
from chatgate.protocol.anthropic import (
    Conversation,
    CountTokensRequest,
    MessageResponse,
    MessagesRequest,
    MessageStreamEvent,
    MessageUsage,
    StopReason,
    TextContent,
    TokenCount,
    ToolResultBlock,
    ToolUseBlock,
    ToolUseContent,
)
from chatgate.protocol.openai import ChatCompletionRequest
from chatgate.protocol.openai import Usage as ChatUsage
from chatgate.protocol.worker import GenerateParams, TokenizeParams, WorkerChunk

# Chat's parameter names in errors raised below this module, as a Messages request names them.
_PARAMS = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences"}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _chat_messages(request: Conversation) -> list[dict[str, Any]]:
    """The conversation as chat messages: tool results become `tool` messages (before the
    turn's text, as Anthropic requires them first), tool uses an assistant turn's calls."""
    out: list[dict[str, Any]] = []
    system = request.system_text()
    if system:
        out.append({"role": "system", "content": system})
    for message in request.messages:
        blocks = message.blocks()
        text = "".join(b.text for b in blocks if b.type == "text")
        if message.role == "user":
            for result in (b for b in blocks if isinstance(b, ToolResultBlock)):
                out.append({"role": "tool", "tool_call_id": result.tool_use_id, "content": result.text()})
            if text or not any(isinstance(b, ToolResultBlock) for b in blocks):
                out.append({"role": "user", "content": text})
            continue
        calls = [
            {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
            for b in blocks
            if isinstance(b, ToolUseBlock)
        ]
        out.append({"role": "assistant", "content": text if text or not calls else None, **({"tool_calls": calls} if calls else {})})
    return out


def _chat_tools(request: Conversation) -> dict[str, Any]:
    """`tools`, `tool_choice` and `parallel_tool_calls` in chat's form."""
    if not request.tools:
        return {}
    tools = [
        {"type": "function", "function": {k: v for k, v in {"name": t.name, "description": t.description, "parameters": t.input_schema}.items() if v is not None}}
        for t in request.tools
    ]
    out: dict[str, Any] = {"tools": tools}
    choice = request.tool_choice
    if choice is not None:
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or {
            "type": "function",
            "function": {"name": str(choice.name)},
        }
        if choice.disable_parallel_tool_use:
            out["parallel_tool_calls"] = False
    return out


class MessagesAsChat(ChatCompletionRequest):
    """A Messages request as the chat request it amounts to, carrying the original for the reply."""

    source: MessagesRequest = Field(exclude=True)


def to_chat(request: MessagesRequest) -> MessagesAsChat:
    """The chat request a Messages request amounts to."""
    body = {
        "model": request.model,
        "messages": _chat_messages(request),
        **_chat_tools(request),
        "max_completion_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "stop": request.stop_sequences or None,
        "user": request.metadata.user_id if request.metadata else None,
        "stream": request.stream,
    }
    return MessagesAsChat.model_validate({**{k: v for k, v in body.items() if v is not None}, "source": request})


def content_of(choice: Choice, tool_plan: ToolPlan | None) -> tuple[list[TextContent | ToolUseContent], StopReason]:
    """A finished reply's content blocks (its tool uses, or its text) and why it stopped."""
    calls = tool_plan.parse(choice.text) if tool_plan is not None and choice.finish_reason == "stop" else None
    uses: list[TextContent | ToolUseContent] = []
    for call in calls or []:
        try:  # an upstream's call is passed on as made: its arguments may not be an object
            arguments = json.loads(call.function.arguments)
        except (ValueError, RecursionError):
            arguments = None
        if isinstance(arguments, dict):
            uses.append(ToolUseContent(id=_id("toolu"), name=call.function.name, input=arguments))
    if uses:
        return uses, "tool_use"
    if choice.finish_reason == "length":
        reason: StopReason = "max_tokens"
    else:
        reason = "stop_sequence" if choice.stop_sequence else "end_turn"
    return [TextContent(text=choice.text)] if choice.text else [], reason


def _usage(choice: Choice) -> MessageUsage:
    return MessageUsage(input_tokens=choice.usage.prompt_tokens, output_tokens=choice.usage.completion_tokens)


@dataclass
class MessagesReply(Reply[MessageResponse, MessageStreamEvent]):
    """Builds the `message`, or its events: text as it comes, or, with tools, every block when
    the reply ends (only then is it known to be tool uses or text). `message_start` waits for
    the first chunk, which says how many input tokens the prompt took."""

    request: MessagesRequest
    tool_plan: ToolPlan | None
    id: str = field(default_factory=lambda: _id("msg"))
    started: bool = False
    text_open: bool = False

    def _message(self, choice: Choice | None = None) -> MessageResponse:
        usage = _usage(choice) if choice is not None else MessageUsage()
        return MessageResponse(id=self.id, model=self.request.model, usage=usage)

    def _start(self, choice: Choice) -> Iterator[MessageStreamEvent]:
        self.started = True
        message = self._message(choice).model_copy(update={"usage": MessageUsage(input_tokens=choice.usage.prompt_tokens)})
        yield MessageStreamEvent(type="message_start", message=message)
        yield MessageStreamEvent(type="ping")

    def _text(self, index: int, text: str) -> Iterator[MessageStreamEvent]:
        if not self.text_open:
            self.text_open = True
            yield MessageStreamEvent(type="content_block_start", index=index, content_block=TextContent())
        if text:
            yield MessageStreamEvent(type="content_block_delta", index=index, delta={"type": "text_delta", "text": text})

    def chunks(self, index: int, part: WorkerChunk, choice: Choice, sent: int) -> Iterable[MessageStreamEvent]:
        if not self.started:
            yield from self._start(choice)
        if self.tool_plan is None and part.text:
            yield from self._text(0, part.text)
        if part.finish_reason:
            yield from self._closing(choice)

    def _closing(self, choice: Choice) -> Iterator[MessageStreamEvent]:
        blocks, reason = content_of(choice, self.tool_plan)
        if self.tool_plan is not None:
            for index, block in enumerate(blocks):
                if isinstance(block, TextContent):
                    yield from self._text(index, block.text)
                    yield MessageStreamEvent(type="content_block_stop", index=index)
                    continue
                yield MessageStreamEvent(type="content_block_start", index=index, content_block=block.model_copy(update={"input": {}}))
                delta = {"type": "input_json_delta", "partial_json": block.input_json()}
                yield MessageStreamEvent(type="content_block_delta", index=index, delta=delta)
                yield MessageStreamEvent(type="content_block_stop", index=index)
        elif self.text_open:
            yield MessageStreamEvent(type="content_block_stop", index=0)
        stop = choice.stop_sequence if reason == "stop_sequence" else None
        usage = {"input_tokens": choice.usage.prompt_tokens, "output_tokens": choice.usage.completion_tokens}
        yield MessageStreamEvent(type="message_delta", delta={"stop_reason": reason, "stop_sequence": stop}, usage=usage)
        yield MessageStreamEvent(type="message_stop")

    def usage_chunk(self, usage: ChatUsage) -> MessageStreamEvent:
        # Never asked for: the converted request has no stream_options; usage rides on message_delta.
        raise NotImplementedError("a Messages stream carries usage in message_delta")

    def response(self, choices: list[Choice], usage: ChatUsage) -> MessageResponse:
        choice = choices[0]
        blocks, reason = content_of(choice, self.tool_plan)
        stop = choice.stop_sequence if reason == "stop_sequence" else None
        return self._message(choice).model_copy(update={"content": blocks, "stop_reason": reason, "stop_sequence": stop})


class MessagesServing(GenerationServing[MessagesAsChat, MessageResponse, MessageStreamEvent]):
    """Serves `/v1/messages` on the shared request flow: conversion and events only."""

    param_names = _PARAMS

    def prepare(self, request: MessagesAsChat) -> tuple[list[GenerateParams], MessagesReply]:
        tool_plan = plan(request)
        params = to_params(request, tool_plan).model_copy(update={"max_tokens_param": "max_tokens"})
        return [params], MessagesReply(request.source, tool_plan)


class TokenCountServing:
    """Counts a Messages request's input tokens on a worker serving its model, with the model's
    own tokenizer and chat template, as generation renders the conversation."""

    def __init__(self, *, pool: WorkerPool) -> None:
        self._pool = pool

    async def count(self, request: CountTokensRequest) -> TokenCount:
        """The input tokens `request` would take."""
        chat = ChatCompletionRequest.model_validate(
            {"model": request.model, "messages": _chat_messages(request), **_chat_tools(request)}
        )
        params = TokenizeParams(messages=render_messages(chat, plan(chat)), add_generation_prompt=True, add_special_tokens=False)
        result = await with_failover(self._pool, request.model, lambda worker: worker.tokenize(params))
        return TokenCount(input_tokens=len(result.tokens))
