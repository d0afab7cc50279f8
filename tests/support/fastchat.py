"""A chatgate worker made to look like FastChat's, for the paths that must work with FastChat workers."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


class NoExtensions:
    """Makes a worker look like FastChat's: the same endpoints, no chatgate extensions advertised."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/model_details":
            await JSONResponse({"context_length": 1024})(scope, receive, send)
            return
        await self.app(scope, receive, send)
