"""The one place where exceptions become HTTP error responses (the hierarchy itself is
`chatgate.errors`; the middleware that catches the unexpected is `middleware.py`).

An error is said in the dialect of the API its route belongs to: OpenAI's by default,
Anthropic's on the routes whose `Door` declares it (`error_dialect`). Errors answered before
routing (a missing key, a rate limit, a body too large) find the dialect by the request's path
among the app's routes (`app.state.error_dialects`, built from the routes when the app is made).

Validation errors from the request schema are turned into OpenAI's wording: `param` names the
field as OpenAI does (`messages[0].role`) and `code` says what was wrong with it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Scope

from chatgate.errors import ChatgateError, InvalidRequestError

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
    branch; the branch with an error about a value rather than a type, then the one the body
    matched deepest, then the one with the fewest errors, is the one the client meant, and within it an error about a value says more than one about a type.
    """
    field = tuple(errors[0].get("loc", ()))[:2]
    mine = [e for e in errors if tuple(e.get("loc", ()))[:2] == field]
    branches: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for error in mine:
        branches.setdefault(_branch(error), []).append(error)

    def rank(error: dict[str, Any]) -> tuple[bool, int]:
        return code_of(error) != "invalid_type", len(param_of(tuple(error.get("loc", ()))) or "")

    def fit(group: list[dict[str, Any]]) -> tuple[bool, int, int, bool, int]:
        # A branch whose shape fitted (its errors are about values) is the one meant; then the
        # one the body got furthest into (a list of parts, not a string); then the fewest errors.
        best = max(map(rank, group))
        return best[0], max(len(e.get("loc", ())) for e in group), -len(group), best[0], best[1]

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


class ErrorDialect:
    """How one API says an error: OpenAI's `{"error": {message, type, param, code}}` here."""

    def render(self, exc: ChatgateError, status: int) -> tuple[dict[str, Any], int]:
        """The error's body and HTTP status."""
        return exc.body(), status

    def stream_error(self, exc: ChatgateError, sequence: int) -> dict[str, Any]:
        """The data of the `error` event that ends a stream of named events mid-way."""
        return {"type": "error", **exc.body()["error"], "sequence_number": sequence}


# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class AnthropicDialect(ErrorDialect):
    """Anthropic's `{"type": "error", "error": {type, message}}`. A server that cannot take the
    work now (a full queue, no healthy worker) answers 529 `overloaded_error`, as Anthropic does
    and as its SDK retries; other server failures are `api_error`."""

    def render(self, exc: ChatgateError, status: int) -> tuple[dict[str, Any], int]:
        if status == 503 or exc.code == "engine_overloaded":
            status = 529
        return self._body(exc, status), status

    def stream_error(self, exc: ChatgateError, sequence: int) -> dict[str, Any]:
        status = 529 if exc.status == 503 or exc.code == "engine_overloaded" else exc.status
        return self._body(exc, status)

    @staticmethod
    def _body(exc: ChatgateError, status: int) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
        return {"type": "error", "error": {"type": kind, "message": exc.message}}


OPENAI = ErrorDialect()
ANTHROPIC = AnthropicDialect()


@dataclass(frozen=True)
class ErrorDialects:
    """The dialect of each route that does not speak OpenAI's, by path (`app.state.error_dialects`)."""

    routes: Sequence[tuple[re.Pattern[str], ErrorDialect]] = ()

    def of(self, path: str) -> ErrorDialect:
        """The dialect of the route at `path` (OpenAI's where none other matches)."""
        return next((dialect for pattern, dialect in self.routes if pattern.match(path)), OPENAI)


def dialect_of(scope: Scope | None) -> ErrorDialect:
    """The error dialect of the request `scope` is for: its route's, once routed, else the one
    of the route its path names."""
    if scope is None:
        return OPENAI
    declared = getattr(scope.get("route"), "error_dialect", None)
    if isinstance(declared, ErrorDialect):
        return declared
    app = scope.get("app")
    dialects = getattr(getattr(app, "state", None), "error_dialects", None)
    return dialects.of(str(scope.get("path", ""))) if isinstance(dialects, ErrorDialects) else OPENAI


def error_response(exc: ChatgateError, *, status: int | None = None, scope: Scope | None = None) -> JSONResponse:
    """The HTTP response for a chatgate error (with the error's own status unless given), in
    the dialect of the request's route (`scope`; OpenAI's without one)."""
    body, code = dialect_of(scope).render(exc, status or exc.status)
    return JSONResponse(body, status_code=code, headers=exc.headers())


def install(app: FastAPI) -> None:
    """Register the exception handlers on `app`."""

    @app.exception_handler(ChatgateError)
    async def on_chatgate(request: Request, exc: ChatgateError) -> JSONResponse:
        return error_response(exc, scope=request.scope)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc), scope=request.scope)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ChatgateError):  # raised while FastAPI read the body
            return error_response(exc.__cause__, scope=request.scope)
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"Invalid URL ({where})"
        elif exc.status_code == 405:
            message = f"Method not allowed ({where})"
        else:
            message = str(exc.detail)
        # A routing error (unknown URL, wrong method) keeps the status Starlette chose.
        return error_response(InvalidRequestError(message), status=exc.status_code, scope=request.scope)
