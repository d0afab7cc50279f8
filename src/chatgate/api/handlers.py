"""The one place where exceptions become OpenAI-shaped HTTP error responses.

Validation errors from the request schema are turned into OpenAI's wording: `param` names the
field as OpenAI does (`messages[0].role`) and `code` says what was wrong with it.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatgate.errors import ChatgateError, InvalidRequestError, RequestTooLargeError
from chatgate.metrics import ApiMetrics

log = logging.getLogger(__name__)

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}

_LIMIT_CODES = {
    "greater_than": "below_min_value",
    "greater_than_equal": "below_min_value",
    "less_than": "above_max_value",
    "less_than_equal": "above_max_value",
}


def param_of(loc: tuple[Any, ...]) -> str | None:
    """`('body', 'messages', 0, 'role')` -> `messages[0].role`; union branch names are skipped."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    if "[key]" in parts:  # an invalid dict key: name the dict, not the key
        parts = parts[: parts.index("[key]") - 1]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out or None


def code_of(error: dict[str, Any]) -> str:
    """OpenAI's error code for one pydantic error."""
    kind = str(error.get("type", ""))
    if kind == "missing":
        return "missing_required_parameter"
    if kind in _LIMIT_CODES:
        number = "integer" if isinstance(error.get("input"), int) else "decimal"
        return f"{number}_{_LIMIT_CODES[kind]}"
    if kind == "too_short":
        return "empty_array" if not error.get("input") else "array_below_min_length"
    if kind == "too_long":
        return "array_above_max_length"
    if kind.endswith("_type") or kind.endswith("_parsing") or kind in {"model_attributes_type", "int_from_float"}:
        return "invalid_type"
    return "invalid_value"


def _branch(error: dict[str, Any]) -> tuple[Any, ...]:
    """The union branch an error belongs to: its location up to the first branch tag."""
    loc = tuple(error.get("loc", ()))
    for index, part in enumerate(loc):
        if isinstance(part, str) and part != "[key]" and not part.isidentifier():
            return loc[: index + 1]
    return ()


def _best(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The most telling error of the first bad field.

    For a union (a prompt may be a string, strings, or token ids) pydantic reports every
    branch; the branch with the fewest errors is the one the client meant, and within it an
    error about a value says more than one about a type.
    """
    field = tuple(errors[0].get("loc", ()))[:2]
    mine = [e for e in errors if tuple(e.get("loc", ()))[:2] == field]
    branches: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for error in mine:
        branches.setdefault(_branch(error), []).append(error)

    def rank(error: dict[str, Any]) -> tuple[bool, int]:
        return code_of(error) != "invalid_type", len(param_of(tuple(error.get("loc", ()))) or "")

    def fit(group: list[dict[str, Any]]) -> tuple[int, bool, int]:
        best = max(map(rank, group))
        return -len(group), best[0], best[1]

    group = max(list(branches.values()), key=fit)
    return max(group, key=rank)


def validation_error(exc: RequestValidationError) -> ChatgateError:
    """The chatgate error for a request that does not fit the schema."""
    errors = list(exc.errors())
    if not errors:
        return InvalidRequestError("The request body is invalid.")
    if any(e.get("type") == "json_invalid" for e in errors):
        return InvalidRequestError(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        )
    error = _best(errors)
    param = param_of(tuple(error.get("loc", ())))
    code = code_of(error)
    if param is None and code == "invalid_type":
        return InvalidRequestError("The request body must be a JSON object.", code="invalid_type")
    if code == "missing_required_parameter":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param, code=code)
    message = str(error.get("msg", "Invalid value")).removeprefix("Value error, ")
    if param is None:
        return InvalidRequestError(f"Invalid request: {message}.", code=code)
    return InvalidRequestError(f"Invalid value for '{param}': {message}.", param=param, code=code)


def error_response(exc: ChatgateError) -> JSONResponse:
    """The HTTP response for a chatgate error."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


class _HttpStatusError(InvalidRequestError):
    """A routing error (unknown URL, wrong method) with the status Starlette chose."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status  # type: ignore[misc]


def install(app: FastAPI) -> None:
    """Register the exception handlers on `app`."""

    @app.exception_handler(ChatgateError)
    async def on_chatgate(request: Request, exc: ChatgateError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ChatgateError):  # raised while FastAPI read the body
            return error_response(exc.__cause__)
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"Invalid URL ({where})"
        elif exc.status_code == 405:
            message = f"Method not allowed ({where})"
        else:
            message = str(exc.detail)
        return error_response(_HttpStatusError(message, exc.status_code))


class GuardMiddleware:
    """Outermost layer: request ids, the body size cap, and a 500 for anything unexpected.

    Every response carries `x-request-id` (the client's own, or a fresh one); an unexpected
    error becomes an OpenAI-shaped 500 naming that id, never a traceback.
    """

    def __init__(self, app: ASGIApp, *, max_body: int, metrics: ApiMetrics | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id") or f"req_{uuid.uuid4().hex}".encode()
        started = False
        status = 500
        begin = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        async def fail(error: ChatgateError) -> None:
            if not started:
                await error_response(error)(scope, receive, send_with_id)

        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body:
            await fail(self._too_large())
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise self._too_large()
            return message

        try:
            await self.app(scope, counted_receive, send_with_id)
        except RequestTooLargeError as exc:
            await fail(exc)
        except Exception:
            log.exception("unhandled error (request %s)", request_id.decode(errors="replace"))
            await fail(
                ChatgateError(
                    "The server had an error while processing your request. Sorry about that! "
                    f"(request id {request_id.decode(errors='replace')})"
                )
            )
        finally:
            self._observe(scope, status, time.perf_counter() - begin)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        if self.metrics is None:
            return
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        # An unknown model's name is the client's to choose: keep it out of the label values.
        model = "" if status == 404 else str((scope.get("state") or {}).get("model", ""))[:100]
        self.metrics.requests.labels(route=route, model=model, status=str(status)).inc()
        self.metrics.latency.labels(route=route, model=model).observe(seconds)

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"The request body is larger than the limit of {self.max_body} bytes."
        )

