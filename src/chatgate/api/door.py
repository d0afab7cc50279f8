"""The one door every public API route passes, in the same order, by being declared on a router
whose `route_class` is `Door`.

Before the route's code runs:
1. identity: the caller, parsed once from the one key header (`auth.IdentityMiddleware`);
2. limits: the caller's rpm, tpm and parallel slots (`limits.middleware`);
3. body size: the byte cap (`middleware.GuardMiddleware`);
   (1–3 are ASGI layers: they answer from the headers, before a byte of body is read)
4. the validation walk: the raw JSON is parsed and walked (NaN and Infinity, lone surrogates,
   nesting depth, number of values), then validated against the route's `PublicRequest`
   (a route's query parameters, if it declares a query model, are validated against it first);
5. cost caps: the request's `cost()` (choices, log-probability entries counting `echo`, messages,
   tools, calls per turn, schema values of all its schemas together) against the one set of caps;
6. schema checks: every JSON schema the request carries is checked for validity, and every
   regex and grammar (`structured_outputs`, `guided_*`, `grammar`) is compiled.
4–6 run in worker threads (`BodyAdmission`), never on the event loop: a body of large schemas
costs its own request time, not everyone's.
Then the route's work runs:
7. disconnect handling: if the client leaves before the answer is ready, the work is cancelled
   (streams are cancelled by `ClosingStreamingResponse` once they run);
8. charging: the serving flow charges what the work used (`limits.grant.charge`).

A route is declared as `async def name(body: SomeRequest, request: Request) -> Served`, plus any
path parameters; it returns a response model, a stream of chunks (SSE), or `NamedEvents` (the
Responses API's named SSE events). A `Door` subclass may declare the API's `error_dialect`
(Anthropic's routes do): every error of its routes is said in it. `create_api_app` refuses to build an app with a public route
that is not a `Door`, and a `Door` refuses a body that is not a `PublicRequest`.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, get_type_hints

import anyio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from chatgate import tracing
from chatgate.api import access
from chatgate.api.auth import caller
from chatgate.api.deadline import Deadline, requested_deadline, stream_within, within
from chatgate.api.disconnect import ClientGone, unless_disconnected
from chatgate.api.limits.grant import check_priority
from chatgate.api.errors import OPENAI, ErrorDialect, validation_error
from chatgate.api.pieces import is_large, json_in_pieces
from chatgate.api.sse import named_sse, sse
from chatgate.api.state import api_state
from chatgate.errors import ChatgateError, InvalidRequestError
from chatgate.protocol.limits import CostError, PublicRequest, check_volume
from chatgate.protocol.embeddings import EmbeddingResponse
from chatgate.protocol.openai import ErrorResponse, valid_schema
from chatgate.protocol.responses import StreamEvent
from chatgate.protocol.structured import check_grammar
from chatgate.http_stream import ClosingStreamingResponse

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SMALL_BODY = 64 * 1024


class BodyAdmission:
    """Where bodies are checked: threads of their own, in two lanes. Small bodies (nearly every
    request) go two at a time; large ones one at a time and one per caller, so a caller sending
    large bodies waits behind its own and delays nobody's small ones. A check cannot be
    cancelled once it runs: a client that leaves still costs its body's check, bounded by the
    walk's caps. One per app (`app.state.admission`)."""

    def __init__(self) -> None:
        self._small = anyio.CapacityLimiter(2)
        self._large = anyio.CapacityLimiter(1)
        self._large_by_caller: weakref.WeakValueDictionary[str, anyio.Lock] = weakref.WeakValueDictionary()

    async def admit(self, model: type[PublicRequest], raw: bytes, caller: str) -> PublicRequest:
        """`admit_body` in the lane the body's size and its caller (a key's name, or the
        client's address) call for."""
        if len(raw) <= SMALL_BODY:
            return await anyio.to_thread.run_sync(admit_body, model, raw, limiter=self._small)
        own = self._large_by_caller.get(caller)
        if own is None:
            own = self._large_by_caller[caller] = anyio.Lock()
        async with own:
            return await anyio.to_thread.run_sync(admit_body, model, raw, limiter=self._large)


@dataclass(frozen=True)
class NamedEvents:
    """A stream of named events (`event:` and `data:` lines): the Responses API's, or any
    whose events carry their name in `type` (Anthropic's)."""

    events: AsyncGenerator[StreamEvent, None] | AsyncGenerator[BaseModel, None]


Served = BaseModel | AsyncGenerator[BaseModel, None] | NamedEvents


def admit_body(model: type[PublicRequest], raw: bytes) -> PublicRequest:
    """Steps 4–6 of the door on a raw body: parse, walk, validate, cost, schemas. CPU work
    bounded by the body cap and `max_json_values`: run it off the event loop."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_type")
    if (entry := access.record()) is not None:
        entry.note_prompt(data)
    try:  # only the volume here: each field's own walk names the field a bad value is in
        check_volume(data, max_depth=model.max_json_depth, max_values=model.max_json_values)
    except ValueError as exc:
        raise InvalidRequestError(f"Invalid request body: {exc}.", code="invalid_value") from None
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise body_error(exc) from None
    try:
        body.cost().check()
    except CostError as exc:
        raise InvalidRequestError(f"Invalid value for '{exc.param}': {exc}.", param=exc.param, code="invalid_value") from None
    for param, schema in body.schemas():
        try:
            valid_schema(schema)
        except ValueError as exc:
            raise InvalidRequestError(f"Invalid value for '{param}': {exc}.", param=param, code="invalid_value") from None
    for param, spec in body.grammars():
        try:
            check_grammar(spec)
        except ValueError as exc:
            raise InvalidRequestError(f"Invalid value for '{param}': {exc}", param=param, code="invalid_value") from None
    return body


def admit_query(model: type[BaseModel], request: Request) -> BaseModel:
    """The request's query parameters as `model`, or a 400 naming the parameter."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise validation_error(RequestValidationError(list(exc.errors()))) from None


def body_error(exc: ValidationError) -> ChatgateError:
    """The 400 for a body that does not fit its schema, naming the field as OpenAI does."""
    return validation_error(RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]))


def caller_name(request: Request) -> str:
    """Who sent `request`, for fairness between callers: its key's name, else its address."""
    who = caller.get()
    if who is not None:
        return who.store_key
    return request.client.host if request.client is not None else ""


def lasting(result: Served, deadline: Deadline) -> Served:
    """`result` with its stream, if it has one, ended at `deadline`."""
    if isinstance(result, NamedEvents):
        return NamedEvents(stream_within(deadline, result.events))
    if isinstance(result, BaseModel):
        return result
    return stream_within(deadline, result)


def respond(result: Served, request: Request) -> Response:
    """A JSON response, or an SSE stream for a streamed result."""
    write_timeout = api_state(request).stream_write_timeout
    request_id = str(getattr(request.state, "request_id", ""))
    if isinstance(result, EmbeddingResponse) and is_large(result.data):
        return ClosingStreamingResponse(
            json_in_pieces(result, "data"), media_type="application/json", write_timeout=write_timeout
        )
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), media_type="application/json")
    dialect = getattr(request.scope.get("route"), "error_dialect", OPENAI)
    body = named_sse(result.events, request_id, dialect) if isinstance(result, NamedEvents) else sse(result, request_id)
    return ClosingStreamingResponse(body, media_type="text/event-stream", write_timeout=write_timeout, headers=_SSE_HEADERS)


def label_model(request: Request, model: str) -> None:
    """Name the model in this request's metrics, if it is served: the client chooses the name,
    and label values it invents would grow `/metrics` without bound."""
    if model and model in api_state(request).pool.readiness():
        request.state.model = model


# What the schema says every route may answer besides its result: an error in OpenAI's shape
# (400 for every invalid body, never FastAPI's 422), and for generation routes an SSE stream.
_ERRORS: dict[int | str, dict[str, Any]] = {"4XX": {"model": ErrorResponse}, "5XX": {"model": ErrorResponse}}
_STREAM: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


class Door(APIRoute):
    """A public API route: its handler runs the door's steps, then the endpoint."""

    error_dialect: ErrorDialect = OPENAI  # how its errors are said (`chatgate.api.errors`)
    error_model: type[BaseModel] = ErrorResponse  # their schema, for the OpenAPI document

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        body = get_type_hints(endpoint).get("body")
        if body is not None and not (isinstance(body, type) and issubclass(body, PublicRequest)):
            raise TypeError(f"{path}: a public route's body must be a PublicRequest, not {body!r}")
        self.body_model: type[PublicRequest] | None = body
        # A query model (`query: Annotated[Model, Query()]`): its fields are the route's query
        # parameters in the schema, and the door validates them as it does a body.
        query = get_type_hints(endpoint).get("query")
        self.query_model: type[BaseModel] | None = query if isinstance(query, type) and issubclass(query, BaseModel) else None
        streams = any(model is not None and "stream" in model.model_fields for model in (body, self.query_model))
        errors = {status: {"model": self.error_model} for status in _ERRORS}
        kwargs["responses"] = {**errors, **(_STREAM if streams else {}), **(kwargs.get("responses") or {})}
        super().__init__(path, endpoint, **kwargs)  # builds the handler, which reads body_model

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint, body_model, query_model = self.endpoint, self.body_model, self.query_model

        async def handle(request: Request) -> Response:
            kwargs: dict[str, Any] = {"request": request, **request.path_params}
            deadline = requested_deadline(request)
            if query_model is not None:
                kwargs["query"] = admit_query(query_model, request)
            if body_model is not None:
                raw = await within(deadline, request.body())
                admission: BodyAdmission = request.app.state.admission
                with tracing.span("chatgate.validate", {"http.request.body.size": len(raw)}):
                    body = await within(deadline, admission.admit(body_model, raw, caller_name(request)))
                check_priority(body.scheduling_priority())
                kwargs["body"] = body
                label_model(request, request.path_params.get("model") or str(getattr(body, "model", "")))
            try:
                result = await unless_disconnected(request, within(deadline, endpoint(**kwargs)))
            except ClientGone:
                return Response(status_code=499)  # nobody reads it; nginx's code for a client that left
            except ValidationError as exc:
                # A request the door admitted but serving could not convert (a cap the body's
                # `cost` missed): the client's error, said as one, and logged for us to close.
                log.warning("admitted request failed conversion on %s: %s", request.url.path, exc)
                raise body_error(exc) from None
            return respond(result if deadline is None else lasting(result, deadline), request)

        return handle
