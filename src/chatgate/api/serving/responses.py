"""`/v1/responses` (stateless): a Responses request becomes a chat request, so the chat template,
tool plan and constraints are chat's; its result becomes a `response` object or named events.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from chatgate.api.serving.chat import to_params
from chatgate.api.serving.generation import Choice, GenerationServing, Reply, chat_logprobs
from chatgate.api.serving.tools import ToolPlan, plan
from chatgate.protocol.openai import ChatCompletionRequest, Usage, now
from chatgate.protocol.responses import (
    FunctionCallInput,
    FunctionCallOutput,
    FunctionCallOutputInput,
    IncompleteDetails,
    InputTokensDetails,
    InputMessage,
    OutputItem,
    OutputMessage,
    OutputText,
    ReasoningOutput,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    StreamEvent,
)
from chatgate.protocol.worker import GenerateParams, WorkerChunk, WorkerLogprob

# Chat's parameter names in errors raised below this module, as a Responses request names them.
_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format.json_schema.schema": "text.format.schema",
    "response_format": "text.format",
}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def to_chat(request: ResponsesRequest) -> ResponsesAsChat:
    """The chat request a Responses request amounts to."""
    fmt = request.text.format if request.text else None
    response_format: dict[str, Any] | None = None
    if fmt is not None and fmt.type == "json_object":
        response_format = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
        response_format = {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}
    choice: Any = request.tool_choice
    if choice is not None and not isinstance(choice, str):
        choice = {"type": "function", "function": {"name": choice.name}}
    body = {
        "model": request.model,
        "messages": _messages(request),
        "max_completion_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "tools": [{"type": "function", "function": t.definition().model_dump(exclude_none=True)} for t in request.tools or []] or None,
        "tool_choice": choice,
        "parallel_tool_calls": request.parallel_tool_calls,
        "response_format": response_format,
        "logprobs": request.logprobs or None,
        "top_logprobs": request.top_logprobs if request.logprobs else None,
        "stream": request.stream,
        "cache_salt": request.cache_salt,
        "priority": request.priority or None,
        "reasoning_effort": request.reasoning.effort if request.reasoning else None,
    }
    return ResponsesAsChat.model_validate({**{k: v for k, v in body.items() if v is not None}, "source": request})


def _messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if request.instructions:
        out.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        return [*out, {"role": "user", "content": request.input}]
    for item in request.input:
        if isinstance(item, InputMessage):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallInput):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputInput):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        # A `reasoning` item is left out: chat templates drop earlier turns' thinking too.
    return out


def output_items(choice: Choice, tool_plan: ToolPlan | None, with_logprobs: bool = False) -> list[OutputItem]:
    """A finished reply as output items: its thinking if any, then its function calls or one message."""
    thinking: list[OutputItem] = []
    if choice.reasoning:
        thinking.append(ReasoningOutput(id=_id("rs"), content=[ReasoningText(text=choice.reasoning)]))
    return thinking + _answer(choice, tool_plan, with_logprobs)


def _answer(choice: Choice, tool_plan: ToolPlan | None, with_logprobs: bool) -> list[OutputItem]:
    calls = tool_plan.parse(choice.text) if tool_plan is not None and choice.finish_reason == "stop" else None
    if calls:
        return [
            FunctionCallOutput(id=_id("fc"), call_id=c.id, name=c.function.name, arguments=c.function.arguments)
            for c in calls
        ]
    message = OutputMessage(id=_id("msg"), content=[OutputText(text=choice.text, logprobs=_logprobs(choice.logprobs, with_logprobs))])
    if choice.finish_reason == "length":
        message.status = "incomplete"
    return [message]


def _logprobs(items: list[WorkerLogprob] | None, wanted: bool) -> list[Any]:
    """Output text log-probabilities in OpenAI's shape (chat's, per token), or none."""
    return (chat_logprobs(items or []).content or []) if wanted else []


@dataclass(frozen=True)
class _Head:
    """What every `response` object of one request repeats."""

    id: str
    created_at: int
    request: ResponsesRequest

    def response(self, choice: Choice | None = None, output: list[OutputItem] | None = None) -> ResponseObject:
        """The response in progress (no choice yet), or finished with `choice`'s `output`."""
        r = self.request
        done = choice is not None
        cut = choice is not None and choice.finish_reason == "length"
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=("incomplete" if cut else "completed") if done else "in_progress",
            model=r.model,
            output=output or [],
            usage=_usage(choice) if choice is not None else None,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if cut else None,
            instructions=r.instructions,
            max_output_tokens=r.max_output_tokens,
            temperature=1.0 if r.temperature is None else r.temperature,
            top_p=1.0 if r.top_p is None else r.top_p,
            tools=[t.model_dump(exclude_none=True) for t in r.tools or []],
            tool_choice=r.tool_choice.model_dump() if r.tool_choice is not None and not isinstance(r.tool_choice, str) else (r.tool_choice or "auto"),
            parallel_tool_calls=r.parallel_tool_calls is not False,
            text={"format": r.text.format.model_dump(exclude_none=True, by_alias=True)} if r.text and r.text.format else {"format": {"type": "text"}},
            metadata=r.metadata or {},
        )


def _usage(choice: Choice) -> ResponseUsage:
    u = choice.usage
    usage = ResponseUsage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, total_tokens=u.prompt_tokens + u.completion_tokens,
                          input_tokens_details=InputTokensDetails(cached_tokens=u.prompt_tokens_details.cached_tokens))
    if u.completion_tokens_details is not None:
        usage.output_tokens_details.reasoning_tokens = u.completion_tokens_details.reasoning_tokens
    return usage


class _Events:
    """Numbers the events of one stream."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self, kind: str, **fields: Any) -> StreamEvent:
        event = StreamEvent(type=kind, sequence_number=self._next, **fields)
        self._next += 1
        return event

    def message_open(self, index: int, item_id: str) -> Iterator[StreamEvent]:
        """A message item and its (empty) text part begin."""
        yield self("response.output_item.added", output_index=index, item=OutputMessage(id=item_id, status="in_progress"))
        yield self("response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=OutputText())

    def delta(self, index: int, item_id: str, text: str, logprobs: list[Any] | None = None) -> StreamEvent:
        """More text of a message (with its tokens' log-probabilities when asked for)."""
        return self("response.output_text.delta", item_id=item_id, output_index=index, content_index=0, delta=text, logprobs=logprobs or [])

    def message_close(self, index: int, message: OutputMessage) -> Iterator[StreamEvent]:
        """A message's text part and the item end."""
        part = message.content[0]
        place = {"item_id": message.id, "output_index": index, "content_index": 0}
        yield self("response.output_text.done", **place, text=part.text, logprobs=part.logprobs)
        yield self("response.content_part.done", **place, part=part)
        yield self("response.output_item.done", output_index=index, item=message)

    def reasoning_open(self, index: int, item_id: str) -> Iterator[StreamEvent]:
        """A reasoning item and its (empty) reasoning text part begin."""
        yield self("response.output_item.added", output_index=index, item=ReasoningOutput(id=item_id, status="in_progress"))
        yield self("response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=ReasoningText())

    def reasoning_delta(self, index: int, item_id: str, text: str) -> StreamEvent:
        """More thinking."""
        return self("response.reasoning_text.delta", item_id=item_id, output_index=index, content_index=0, delta=text)

    def reasoning_close(self, index: int, item: ReasoningOutput) -> Iterator[StreamEvent]:
        """The reasoning text part and the item end."""
        place = {"item_id": item.id, "output_index": index, "content_index": 0}
        yield self("response.reasoning_text.done", **place, text=item.content[0].text)
        yield self("response.content_part.done", **place, part=item.content[0])
        yield self("response.output_item.done", output_index=index, item=item)

    def call(self, index: int, call: FunctionCallOutput) -> Iterator[StreamEvent]:
        """A function call item, whole: added, its arguments, done."""
        yield self("response.output_item.added", output_index=index, item=call.model_copy(update={"arguments": "", "status": "in_progress"}))
        place = {"item_id": call.id, "output_index": index}
        yield self("response.function_call_arguments.delta", **place, delta=call.arguments)
        yield self("response.function_call_arguments.done", **place, arguments=call.arguments)
        yield self("response.output_item.done", output_index=index, item=call)


class ResponsesAsChat(ChatCompletionRequest):
    """A Responses request as the chat request it amounts to, carrying the original for the reply."""

    source: ResponsesRequest = Field(exclude=True)


@dataclass
class ResponsesReply(Reply[ResponseObject, StreamEvent]):
    """Builds the `response` object, or its events: thinking and text as they come (a message
    opens at its first text, after the thinking item closes), or, with tools, every answer
    item when the reply ends (only then is it known to be calls or text)."""

    head: _Head
    tool_plan: ToolPlan | None
    events: _Events = field(default_factory=_Events)
    item_id: str = field(default_factory=lambda: _id("msg"))
    thinking_id: str = field(default_factory=lambda: _id("rs"))
    thought: str = ""  # thinking streamed so far
    opened: list[str] = field(default_factory=list)  # items opened so far ("reasoning", "message")

    def opening(self, choices: int) -> Iterable[StreamEvent]:
        yield self.events("response.created", response=self.head.response())
        yield self.events("response.in_progress", response=self.head.response())

    def chunks(self, index: int, part: WorkerChunk, choice: Choice, sent: int) -> Iterable[StreamEvent]:
        if part.reasoning_content:
            if "reasoning" not in self.opened:
                self.opened.append("reasoning")
                yield from self.events.reasoning_open(0, self.thinking_id)
            self.thought += part.reasoning_content
            yield self.events.reasoning_delta(0, self.thinking_id, part.reasoning_content)
        if part.text and self.tool_plan is None:
            yield from self._message_open()
            yield self.events.delta(len(self.opened) - 1, self.item_id, part.text, _logprobs(part.token_logprobs, self.head.request.logprobs))
        if part.finish_reason:
            yield from self._closing(choice)

    def _message_open(self) -> Iterable[StreamEvent]:
        """Close the thinking and open the message, unless the message is open already."""
        if "message" in self.opened:
            return
        if "reasoning" in self.opened:
            yield from self.events.reasoning_close(0, self._thinking())
        self.opened.append("message")
        yield from self.events.message_open(len(self.opened) - 1, self.item_id)

    def _thinking(self) -> ReasoningOutput:
        return ReasoningOutput(id=self.thinking_id, content=[ReasoningText(text=self.thought)])

    def _closing(self, choice: Choice) -> Iterable[StreamEvent]:
        output = output_items(choice, self.tool_plan, self.head.request.logprobs)
        for index, item in enumerate(output):
            if isinstance(item, ReasoningOutput):  # streamed already, under this id
                output[index] = thinking = self._thinking()
                if self.tool_plan is not None:  # else the message's opening closes it
                    yield from self.events.reasoning_close(index, thinking)
            elif isinstance(item, FunctionCallOutput):
                yield from self.events.call(index, item)
            elif self.tool_plan is None:  # its text has streamed already, under this id
                yield from self._message_open()
                output[index] = item = item.model_copy(update={"id": self.item_id})
                yield from self.events.message_close(index, item)
            else:
                yield from self.events.message_open(index, item.id)
                yield self.events.delta(index, item.id, item.content[0].text, item.content[0].logprobs)
                yield from self.events.message_close(index, item)
        final = self.head.response(choice, output)
        yield self.events("response.completed" if final.status == "completed" else "response.incomplete", response=final)

    def usage_chunk(self, usage: Usage) -> StreamEvent:
        # Never asked for: the converted request has no stream_options; usage rides on
        # response.completed.
        raise NotImplementedError("a Responses stream carries usage in response.completed")

    def response(self, choices: list[Choice], usage: Usage) -> ResponseObject:
        return self.head.response(choices[0], output_items(choices[0], self.tool_plan, self.head.request.logprobs))


class ResponsesServing(GenerationServing[ResponsesAsChat, ResponseObject, StreamEvent]):
    """Serves `/v1/responses` on the shared request flow: conversion and events only."""

    param_names = _PARAMS

    def prepare(self, request: ResponsesAsChat) -> tuple[list[GenerateParams], ResponsesReply]:
        tool_plan = plan(request)
        params = to_params(request, tool_plan).model_copy(update={"prompt_param": "input", "max_tokens_param": "max_output_tokens"})
        head = _Head(id=_id("resp"), created_at=now(), request=request.source)
        return [params], ResponsesReply(head, tool_plan)


def stream_of(response: ResponseObject) -> list[StreamEvent]:
    """The events a stream of the finished `response` would have been: created, in progress,
    each output item (a message's text as one delta), and the final event. The same every time,
    so a response kept without its events replays with stable numbers."""
    events = _Events()
    begun = response.model_copy(update={"status": "in_progress", "output": [], "usage": None, "incomplete_details": None})
    out = [events("response.created", response=begun), events("response.in_progress", response=begun)]
    for index, item in enumerate(response.output):
        if isinstance(item, FunctionCallOutput):
            out += events.call(index, item)
            continue
        if isinstance(item, ReasoningOutput):
            thought = item.content[0] if item.content else ReasoningText()
            out += events.reasoning_open(index, item.id)
            out.append(events.reasoning_delta(index, item.id, thought.text))
            out += events.reasoning_close(index, item.model_copy(update={"content": [thought]}))
            continue
        part = item.content[0] if item.content else OutputText()
        out += events.message_open(index, item.id)
        out.append(events.delta(index, item.id, part.text, part.logprobs))
        out += events.message_close(index, item.model_copy(update={"content": [part]}))
    final = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(response.status, "response.failed")
    out.append(events(final, response=response))
    return out


def pending(request: ResponsesRequest, response_id: str) -> ResponseObject:
    """The `response` object of a request not yet run (a background one's, queued)."""
    return _Head(id=response_id, created_at=now(), request=request).response().model_copy(update={"status": "queued", "background": True})


def new_response_id() -> str:
    """A fresh response id."""
    return _id("resp")
