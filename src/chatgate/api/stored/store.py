"""The Responses API's stored responses over a `Backend`: who may see what, what a kept response
holds, continuing one, keeping a stream's events and replaying them.

A response belongs to the key that made it (its `store_key`; one shared owner when no keys are
checked): any other key is told it does not exist (404), so a key cannot learn whether another's
response id is real. Encoding and decoding a conversation is CPU work bounded by the body cap:
it runs in worker threads, never on the event loop.

Replay (`GET /v1/responses/{id}?stream=true`): a streamed response keeps the very events its
client was sent (same numbers, same deltas), so `starting_after=N` resumes exactly where that
client stopped; a response made without streaming has no events of its own, and replays as the
events a stream of it would have ended with (one text delta per message), made the same way on
every call and replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import Any

import anyio
from pydantic import TypeAdapter

from chatgate.api.auth import caller
from chatgate.api.serving.responses import stream_of
from chatgate.api.stored.backend import RUNNING, Backend, Record
from chatgate.errors import ChatgateError, InvalidRequestError
from chatgate.protocol.limits import CostError
from chatgate.protocol.responses import (
    FunctionCallOutput,
    InputItem,
    OutputMessage,
    ReasoningOutput,
    ResponseObject,
    ResponsesRequest,
    StreamEvent,
)

_ITEMS = TypeAdapter(list[InputItem])
MAX_ID = 256  # longer ids were never made here: a 404 without asking the backend
STALE = 30.0  # seconds without a write after which a running response's runner is taken for dead
POLL = 0.25  # seconds between looks at a running response's new events


class ResponseNotFoundError(ChatgateError):
    """No stored response of this id for this key (expired, deleted, another key's, or never)."""

    status = 404
    type = "invalid_request_error"
    default_code = None


@dataclass(frozen=True)
class Kept:
    """One kept response, decoded: its owner, the object, the items of its own input, and the
    whole conversation it ends (earlier turns, its input, its output) as input items."""

    owner: str
    response: ResponseObject
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]
    updated: float

    def with_response(self, response: ResponseObject) -> Kept:
        """The same kept response in a new state: its conversation ends with the new output."""
        base = self.history[: len(self.history) - len(self.response.output)]
        return replace(self, response=response, history=[*base, *_sent_back(response)])


def owner() -> str:
    """Whom a response made now belongs to: the caller's key (its digest), or everyone."""
    who = caller.get()
    return who.store_key if who is not None else ""


def _sent_back(response: ResponseObject) -> list[dict[str, Any]]:
    """A response's output as the input items that continue it. Past thinking is not shown to
    the model again (templates leave it out), so it is not kept."""
    return [_as_input(item) for item in response.output if not isinstance(item, ReasoningOutput)]


def _as_input(item: FunctionCallOutput | OutputMessage) -> dict[str, Any]:
    """An output item as the input item that sends it back."""
    if isinstance(item, FunctionCallOutput):
        return {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments}
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": p.text} for p in item.content]}


_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def input_items(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's own input as items, each with an id (`input_items` lists them)."""
    items = (
        [{"type": "message", "role": "user", "content": request.input}]
        if isinstance(request.input, str)
        else [item.model_dump(exclude_none=True) for item in request.input]
    )
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for item in items:
        # An item keeps an id of its own (a reasoning item sent back) only if no other has it:
        # `input_items` pages by id, and a repeated or empty one would send a reader in circles.
        own = item.get("id")
        if not own or own in seen:
            own = f"{_ID_PREFIX.get(item['type'], 'item')}_{uuid.uuid4().hex}"
        seen.add(own)
        out.append({"id": own, **_strip_id(item)})
    return out


def _strip_id(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "id"}


def decode(record: Record) -> Kept:
    """A record's JSON as a `Kept` response."""
    data = json.loads(record.data)
    return Kept(record.owner, ResponseObject.model_validate(data["response"]), data["input_items"], data["history"], record.updated)


def not_found(response_id: str) -> ResponseNotFoundError:
    """The one 404 for a response this caller cannot see."""
    return ResponseNotFoundError(f"Response with id '{response_id[:100]}' not found.", param="response_id")


class ResponseStore:
    """Stored responses, each seen only by its owner, over any `Backend`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def get(self, response_id: str, who: str) -> Kept:
        """`who`'s stored response (`owner()` names the caller), or a 404 naming it."""
        record = await self.backend.get(response_id) if len(response_id) <= MAX_ID else None
        if record is None or record.owner != who:
            raise not_found(response_id)
        kept = await anyio.to_thread.run_sync(decode, record)
        if kept.response.status in RUNNING and time.time() - kept.updated > STALE:
            # Its runner stopped writing (a replica that died): it will never finish.
            error = {"code": "server_error", "message": "The server running this background response stopped."}
            kept = replace(kept, response=kept.response.model_copy(update={"status": "failed", "error": error}))
        return kept

    async def delete(self, response_id: str, who: str) -> None:
        """Forget `who`'s stored response (404 if it has none of this id)."""
        await self.get(response_id, who)
        await self.backend.delete(response_id)

    async def keep(
        self, request: ResponsesRequest, response: ResponseObject, earlier: list[dict[str, Any]], who: str,
        *, events: list[StreamEvent] | None = None,
    ) -> Kept | None:
        """Keep `response` for `who` with the conversation it continues (`earlier`) and the events
        it was streamed as; committed when this returns. What was kept (None: too large)."""

        def encoded() -> tuple[Kept, str, list[str] | None]:
            inputs = input_items(request)
            history = [*earlier, *(_strip_id(i) for i in inputs), *_sent_back(response)]
            data = json.dumps({"response": response.model_dump(mode="json"), "input_items": inputs, "history": history})
            texts = [e.model_dump_json() for e in events] if events is not None else None
            return Kept(who, response, inputs, history, time.time()), data, texts

        kept, data, texts = await anyio.to_thread.run_sync(encoded)
        written = await self.backend.put(Record(id=response.id, owner=who, status=response.status, data=data), events=texts)
        return kept if written else None

    async def replace(self, kept: Kept, response: ResponseObject, *, only_from: frozenset[str] | None = None) -> bool:
        """Write a kept response's new state (its inputs as before); with `only_from`, only
        while its kept status is one of those. Whether it was written."""
        new = kept.with_response(response)
        data = await anyio.to_thread.run_sync(
            lambda: json.dumps({"response": response.model_dump(mode="json"), "input_items": new.input_items, "history": new.history})
        )
        return await self.backend.put(Record(id=response.id, owner=kept.owner, status=response.status, data=data), only_from=only_from)

    async def continued(self, request: ResponsesRequest, who: str) -> tuple[ResponsesRequest, list[dict[str, Any]]]:
        """`request` with the conversation of `who`'s `previous_response_id` before its own
        input (that response's instructions are not carried over, as with OpenAI), and that
        conversation; the request itself when it continues nothing."""
        if request.previous_response_id is None:
            return request, []
        try:
            kept = await self.get(request.previous_response_id, who)
        except ResponseNotFoundError as exc:
            exc.message = f"Previous response with id '{request.previous_response_id[:100]}' not found."
            exc.param = "previous_response_id"
            raise
        if kept.response.status in RUNNING:
            raise InvalidRequestError(
                f"Previous response with id '{request.previous_response_id[:100]}' is still {kept.response.status}.",
                param="previous_response_id", code="invalid_value",
            )
        return await anyio.to_thread.run_sync(_whole, request, kept.history), kept.history

    async def keeping(
        self, request: ResponsesRequest, events: AsyncGenerator[StreamEvent, None], earlier: list[dict[str, Any]], who: str
    ) -> AsyncGenerator[StreamEvent, None]:
        """Pass a stream's events on, marked as stored, keeping the final response and the
        events for `who` (before the last event is sent)."""
        sent: list[StreamEvent] = []
        async with contextlib.aclosing(events):
            async for event in events:
                response = getattr(event, "response", None)
                if isinstance(response, ResponseObject):
                    response = mark(response, request)
                    event = event.model_copy(update={"response": response})
                    if request.store is not False and response.status in ("completed", "incomplete"):
                        await self.keep(request, response, earlier, who, events=[*sent, event])
                if request.store is not False:
                    sent.append(event)
                yield event

    async def replay(self, response_id: str, who: str, after: int | None) -> AsyncGenerator[StreamEvent, None]:
        """A kept response's events after number `after` (all without it); a running one's
        are followed until it ends. A 400 if `after` is past the last event of a finished one."""
        kept = await self.get(response_id, who)
        start = -1 if after is None else after
        if kept.response.status in RUNNING:
            return self._follow(kept, start)
        events = await self._finished_events(kept)
        if start > len(events) - 1:
            raise InvalidRequestError(
                f"Invalid value for 'starting_after': {start} is past the response's last event ({len(events) - 1}).",
                param="starting_after", code="invalid_value",
            )
        return _each(events[start + 1 :])

    async def _finished_events(self, kept: Kept) -> list[StreamEvent]:
        texts = await self.backend.events(kept.response.id, 0)
        if not texts:  # made without streaming: as a stream of it would have gone
            return stream_of(kept.response)
        return await anyio.to_thread.run_sync(lambda: [StreamEvent.model_validate_json(t) for t in texts])

    async def _follow(self, kept: Kept, start: int) -> AsyncGenerator[StreamEvent, None]:
        """A running response's events after `start`, as they are kept, until it ends."""
        response_id = kept.response.id
        while True:
            texts = await self.backend.events(response_id, start + 1)
            for text in texts:
                event = StreamEvent.model_validate_json(text)
                start = event.sequence_number
                yield event
            if kept.response.status not in RUNNING:
                if not texts:
                    return
                continue  # the last events may have come with the final state
            await asyncio.sleep(POLL)
            try:
                kept = await self.get(response_id, kept.owner)
            except ResponseNotFoundError:
                return

    async def close(self) -> None:
        """Close the backend."""
        await self.backend.close()


def _whole(request: ResponsesRequest, earlier: list[dict[str, Any]]) -> ResponsesRequest:
    whole = request.model_copy(update={"input": _ITEMS.validate_python([*earlier, *input_items(request)])})
    try:  # the caps hold for the whole conversation the model is shown
        whole.cost().check()
    except CostError as exc:
        raise InvalidRequestError(
            f"Invalid value for 'previous_response_id': with its earlier turns, {exc}.",
            param="previous_response_id",
            code="invalid_value",
        ) from None
    return whole


async def _each(events: list[StreamEvent]) -> AsyncGenerator[StreamEvent, None]:
    for event in events:
        yield event


def mark(response: ResponseObject, request: ResponsesRequest, **update: Any) -> ResponseObject:
    """The response as a stored one says: `store`, the response it continues, and `update`."""
    return response.model_copy(update={"store": request.store is not False, "previous_response_id": request.previous_response_id, **update})
