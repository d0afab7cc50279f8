"""Stored responses of the Responses API (`store`, `previous_response_id`, `GET` / `DELETE
/v1/responses/{id}`), kept in this process's memory.

A response belongs to the key that made it (its `store_key`; one shared owner when no keys are
checked): any other key is told it does not exist (404), so a key cannot learn whether another's
response id is real. Each response is kept for `ttl` seconds, and the store is bounded by count
and by bytes (the JSON of the response and of the conversation it continues): the oldest go
first. A response larger than the whole byte budget is not kept. Nothing survives a restart and
replicas do not share it (as vLLM's store).

Sizing and validating a conversation is CPU work bounded by the body cap: the routes run
`keep` and `continued` in worker threads, and a lock guards the store's own state.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from pydantic import TypeAdapter

from chatgate.api.auth import caller
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


class ResponseNotFoundError(ChatgateError):
    """No stored response of this id for this key (expired, deleted, another key's, or never)."""

    status = 404
    type = "invalid_request_error"
    default_code = None


@dataclass(frozen=True)
class Stored:
    """One kept response: its owner, the object, the items of its own input, and the whole
    conversation it ends (earlier turns, its input, its output) as input items."""

    owner: str
    response: ResponseObject
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]
    size: int
    expires: float


def owner() -> str:
    """Whom a response made now belongs to: the caller's key (its digest), or everyone."""
    who = caller.get()
    return who.store_key if who is not None else ""


def _as_input(item: FunctionCallOutput | OutputMessage) -> dict[str, Any]:
    """An output item as the input item that sends it back."""
    if isinstance(item, FunctionCallOutput):
        return {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments}
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": p.text} for p in item.content]}


_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def _items(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's own input as items, each with an id (`input_items` lists them)."""
    items = (
        [{"type": "message", "role": "user", "content": request.input}]
        if isinstance(request.input, str)
        else [item.model_dump(exclude_none=True) for item in request.input]
    )
    return [{"id": f"{_ID_PREFIX.get(item['type'], 'item')}_{uuid.uuid4().hex}", **item} for item in items]


class ResponseStore:
    """Responses kept for `ttl` seconds, at most `max_count` of them and `max_bytes` together."""

    def __init__(self, *, ttl: float, max_count: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._clock = clock
        self._kept: OrderedDict[str, Stored] = OrderedDict()  # oldest first: expiry order too
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._kept)

    @property
    def bytes(self) -> int:
        """The size of what is kept now."""
        with self._lock:
            self._expire()
            return self._bytes

    def _drop(self, response_id: str) -> None:
        stored = self._kept.pop(response_id, None)
        if stored is not None:
            self._bytes -= stored.size

    def _expire(self) -> None:
        now = self._clock()
        while self._kept:
            oldest = next(iter(self._kept.values()))
            if oldest.expires > now:
                break
            self._drop(oldest.response.id)

    def get(self, response_id: str, who: str) -> Stored:
        """`who`'s stored response (`owner()` names the caller), or a 404 naming it."""
        with self._lock:
            self._expire()
            stored = self._kept.get(response_id)
        if stored is None or stored.owner != who:
            raise ResponseNotFoundError(f"Response with id '{response_id[:100]}' not found.", param="response_id")
        return stored

    def delete(self, response_id: str, who: str) -> None:
        """Forget `who`'s stored response (404 if it has none of this id)."""
        self.get(response_id, who)
        with self._lock:
            self._drop(response_id)

    def keep(self, request: ResponsesRequest, response: ResponseObject, earlier: list[dict[str, Any]], who: str) -> None:
        """Keep `response` for `who`, with the conversation it continues (`earlier`)."""
        inputs = _items(request)
        # Past thinking is not shown to the model again (templates leave it out), so not kept.
        answers = [item for item in response.output if not isinstance(item, ReasoningOutput)]
        history = [*earlier, *inputs, *(_as_input(item) for item in answers)]
        size = len(response.model_dump_json()) + len(json.dumps(inputs)) + len(json.dumps(history))
        if size > self._max_bytes:
            return
        with self._lock:
            self._expire()
            self._drop(response.id)
            while self._kept and (len(self._kept) >= self._max_count or self._bytes + size > self._max_bytes):
                self._drop(next(iter(self._kept)))
            self._kept[response.id] = Stored(who, response, inputs, history, size, self._clock() + self._ttl)
            self._bytes += size

    def continued(self, request: ResponsesRequest, who: str) -> tuple[ResponsesRequest, list[dict[str, Any]]]:
        """`request` with the conversation of `who`'s `previous_response_id` before its own
        input (that response's instructions are not carried over, as with OpenAI), and that
        conversation; the request itself when it continues nothing."""
        if request.previous_response_id is None:
            return request, []
        try:
            earlier = self.get(request.previous_response_id, who).history
        except ResponseNotFoundError as exc:
            exc.message = f"Previous response with id '{request.previous_response_id[:100]}' not found."
            exc.param = "previous_response_id"
            raise
        whole = request.model_copy(update={"input": _ITEMS.validate_python([*earlier, *_items(request)])})
        try:  # the caps hold for the whole conversation the model is shown
            whole.cost().check()
        except CostError as exc:
            raise InvalidRequestError(
                f"Invalid value for 'previous_response_id': with its earlier turns, {exc}.",
                param="previous_response_id",
                code="invalid_value",
            ) from None
        return whole, earlier

    async def keeping(
        self, request: ResponsesRequest, events: AsyncGenerator[StreamEvent, None], earlier: list[dict[str, Any]], who: str
    ) -> AsyncGenerator[StreamEvent, None]:
        """Pass a stream's events on, marked as stored, keeping the final response for `who`."""
        async for event in events:
            response = getattr(event, "response", None)
            if isinstance(response, ResponseObject):
                response = mark(response, request)
                event = event.model_copy(update={"response": response})
                if request.store is not False and response.status in ("completed", "incomplete"):
                    await anyio.to_thread.run_sync(self.keep, request, response, earlier, who)
            yield event


def mark(response: ResponseObject, request: ResponsesRequest) -> ResponseObject:
    """The response as a stored one says: `store` and the response it continues."""
    return response.model_copy(update={"store": request.store is not False, "previous_response_id": request.previous_response_id})
