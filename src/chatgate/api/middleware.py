"""The API server's outermost ASGI layer: request ids, the body size cap, metrics, and a 500
for anything unexpected."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatgate import tracing
from chatgate.api import access
from chatgate.api.errors import error_response
from chatgate.errors import ChatgateError, RequestTooLargeError
from chatgate.metrics import ApiMetrics

log = logging.getLogger(__name__)

# A client's own request id is kept only if it is short and plainly printable: it is echoed in
# headers, logs and error bodies.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def request_id_of(headers: dict[bytes, bytes]) -> bytes:
    """The client's `x-request-id` if it is acceptable, else a fresh id."""
    given = headers.get(b"x-request-id", b"")
    return given if _REQUEST_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}".encode()


class GuardMiddleware:
    """Outermost layer: request ids, the body size cap, and a 500 for anything unexpected.

    Every response carries `x-request-id` (the client's own, or a fresh one); an unexpected
    error becomes an OpenAI-shaped 500 naming that id, never a traceback.
    """

    def __init__(self, app: ASGIApp, *, max_body: int, metrics: ApiMetrics | None = None, log_prompts: bool = False) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = request_id_of(headers)
        # Routes read it as `request.state.request_id` (an SSE error event names it too).
        scope.setdefault("state", {})["request_id"] = request_id.decode()
        started = False
        status = 500
        begin = time.perf_counter()
        entry = access.AccessRecord(
            request_id=request_id.decode(), method=str(scope.get("method", "")), path=str(scope.get("path", ""))[:256],
            trace_id=tracing.trace_id(), keep_prompt=self.log_prompts,
        )
        opened = access.current.set(entry)

        async def send_with_id(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        async def fail(error: ChatgateError) -> None:
            if not started:
                await error_response(error, scope=scope)(scope, receive, send_with_id)

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
            entry.status = status
            entry.route = getattr(scope.get("route"), "path", None)
            entry.model = entry.model or str((scope.get("state") or {}).get("model", "")) or None
            access.write(entry)
            access.current.reset(opened)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        if self.metrics is None:
            return
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        # Routes name the model only when it is served (see `label_model`).
        model = str((scope.get("state") or {}).get("model", ""))
        self.metrics.requests.labels(route=route, model=model, status=str(status)).inc()
        self.metrics.latency.labels(route=route, model=model).observe(seconds)

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"The request body is larger than the limit of {self.max_body} bytes."
        )
