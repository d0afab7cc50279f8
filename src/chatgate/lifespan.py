"""What a process says when its start fails: the one line of a `StartupError`, not a traceback."""

from __future__ import annotations

import logging
import sys

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatgate.errors import StartupError

log = logging.getLogger(__name__)


class OneLineStartupFailure:
    """An ASGI app as it is, except at start: Starlette hands uvicorn the traceback of whatever
    stopped the app's lifespan, and uvicorn logs it whole. When that is a `StartupError` (a bad
    path, a model that cannot load, a flag missing its partner), uvicorn logs its message
    instead; the traceback is kept at debug level. Any other exception is a bug: its traceback
    stays."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def said(message: Message) -> None:
            # Starlette sends the failure from inside its `except` block: the error is the one
            # being handled.
            error = sys.exc_info()[1]
            if message["type"] == "lifespan.startup.failed" and isinstance(error, StartupError):
                log.debug("start failed", exc_info=error)
                message = {**message, "message": f"could not start: {error}"}
            await send(message)

        await self.app(scope, receive, said)
