"""The one place where exceptions become OpenAI-shaped HTTP error responses."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from chatgate.errors import ChatgateError, InvalidRequestError, ModelNotFoundError

log = logging.getLogger(__name__)

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


def param_of(loc: tuple[Any, ...]) -> str | None:
    """`('body', 'messages', 0, 'role')` -> `messages[0].role`; union branch names are skipped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out or None


def _validation_error(exc: RequestValidationError) -> ChatgateError:
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("The request body is invalid.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequestError(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)"
        )
    param = param_of(tuple(first.get("loc", ())))
    message = str(first.get("msg", "Invalid value"))
    return InvalidRequestError(f"{message} (param: {param})" if param else message, param=param)


def error_response(exc: ChatgateError, request: Request) -> JSONResponse:
    """The HTTP response for a chatgate error."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def install(app: FastAPI) -> None:
    """Register the exception handlers on `app`."""

    @app.exception_handler(ChatgateError)
    async def on_chatgate(request: Request, exc: ChatgateError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc), request)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        error: ChatgateError
        if exc.status_code == 404:
            error = ModelNotFoundError(f"Unknown URL: {request.url.path}", code="unknown_url")
        else:
            error = InvalidRequestError(str(exc.detail))
            error.status = exc.status_code  # type: ignore[misc]
        return error_response(error, request)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request.headers.get("x-request-id", "")
        log.exception("unhandled error (request %s)", request_id)
        error = ChatgateError(
            f"The server had an error while processing your request (request id {request_id})."
        )
        return error_response(error, request)
