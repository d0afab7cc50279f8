"""How the processes of a fleet (controller, workers, API server) trust each other.

- `FleetKeyMiddleware`: the controller's and workers' gate: with a fleet key set, every
  endpoint but `/health` needs `Authorization: Bearer <key>` (compared in constant time);
  `/ready` may also be asked with no key at all (orchestrators' probes carry no secrets), and
  then says its status and nothing else.
- `install_protocol_errors`: the worker protocol's error bodies: a request that does not fit
  the schema gets 400 with the reason, a `ChatgateError` its own status.
- `fleet_client`: the pooled HTTP client a process calls its peers with: it sends the key,
  verifies HTTPS peers with the fleet's CA bundle, and carries the caller's trace (`traceparent`).
"""

from __future__ import annotations

import hmac
import ssl

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from chatgate import tracing
from chatgate.errors import AuthenticationError, ChatgateError, InvalidRequestError
from chatgate.settings import FleetSettings

OPEN_PATHS = frozenset({"/health"})
PROBE_PATHS = frozenset({"/ready"})


def anonymous_probe(request: Request) -> bool:
    """Whether `request` reached a probe path without the fleet key (it gets its status only)."""
    return bool(request.scope.get("state", {}).get("anonymous_probe"))


def protocol_error(exc: ChatgateError) -> JSONResponse:
    """A worker-protocol error response: the OpenAI-shaped body plus FastChat's error code."""
    body = {**exc.body(), "error_code": exc.fastchat_code}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers())


class FleetKeyMiddleware:
    """Refuses requests without the fleet key (all but `OPEN_PATHS`) with a 401 JSON body."""

    def __init__(self, app: ASGIApp, *, key: str | None) -> None:
        self.app = app
        self._key = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not given and scope["path"] in PROBE_PATHS:
            scope.setdefault("state", {})["anonymous_probe"] = True
            await self.app(scope, receive, send)
            return
        # compare_digest: the time taken must not tell how much of a guess was right.
        if hmac.compare_digest(given, self._key):
            await self.app(scope, receive, send)
            return
        reason = "Missing fleet key." if not given else "Invalid fleet key."
        error = AuthenticationError(
            f"{reason} Send the fleet's shared key as 'Authorization: Bearer <key>'.",
            code="invalid_fleet_key",
        )
        await protocol_error(error)(scope, receive, send)


def _reason(exc: RequestValidationError) -> str:
    """The first schema error, as `field: message`."""
    errors = list(exc.errors())
    if not errors:
        return "The request body is invalid."
    error = errors[0]
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def install_protocol_errors(app: FastAPI) -> None:
    """400 with a reason for bodies that do not fit the schema; a ChatgateError's own status."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return protocol_error(InvalidRequestError(f"Invalid request: {_reason(exc)}"))

    @app.exception_handler(ChatgateError)
    async def on_chatgate(request: Request, exc: ChatgateError) -> JSONResponse:
        return protocol_error(exc)


def secure(app: FastAPI, settings: FleetSettings) -> None:
    """Guard `app` with the fleet key and give it the protocol's error bodies."""
    install_protocol_errors(app)
    app.add_middleware(FleetKeyMiddleware, key=settings.fleet_key)


def fleet_client(
    settings: FleetSettings, *, timeout: httpx.Timeout, limits: httpx.Limits | None = None
) -> httpx.AsyncClient:
    """The HTTP client a fleet process calls its peers with (key sent, CA bundle trusted; a
    call made within a trace carries its `traceparent`)."""
    return httpx.AsyncClient(
        headers=settings.fleet_headers(),
        event_hooks=tracing.HTTPX_HOOKS,
        verify=ssl.create_default_context(cafile=settings.fleet_ca_bundle) if settings.fleet_ca_bundle else True,
        timeout=timeout,
        limits=limits or httpx.Limits(),
    )
