"""The one place where exceptions become OpenAI-shaped HTTP error responses (the hierarchy
itself is `chatgate.errors`; the middleware that catches the unexpected is `middleware.py`).

Validation errors from the request schema are turned into OpenAI's wording: `param` names the
field as OpenAI does (`messages[0].role`) and `code` says what was wrong with it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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


def error_response(exc: ChatgateError, *, status: int | None = None) -> JSONResponse:
    """The HTTP response for a chatgate error (with the error's own status unless given)."""
    return JSONResponse(exc.body(), status_code=status or exc.status, headers=exc.headers())


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
        # A routing error (unknown URL, wrong method) keeps the status Starlette chose.
        return error_response(InvalidRequestError(message), status=exc.status_code)
