"""The API server app: OpenAI's HTTP API over a router of workers."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatgate.api import handlers
from chatgate.api.auth import KeyChecker
from chatgate.api.backends import Backend
from chatgate.api.routes import openai as openai_routes
from chatgate.api.serving.chat import ChatServing
from chatgate.api.serving.completions import CompletionServing
from chatgate.api.state import ApiState
from chatgate.settings import ApiSettings


class RequestIdMiddleware:
    """Gives every response an `x-request-id`: the client's own, or a fresh one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id") or f"req_{uuid.uuid4().hex}".encode()
        if b"x-request-id" not in headers:
            scope["headers"] = [*scope.get("headers", []), (b"x-request-id", request_id)]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_api_app(settings: ApiSettings, backend: Backend) -> FastAPI:
    """Build the API server; `backend` supplies the router for the app's lifetime."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with backend() as router:
            app.state.api = ApiState(
                router=router,
                keys=KeyChecker(settings.api_keys),
                chat=ChatServing(router=router, max_n=settings.max_n),
                completions=CompletionServing(router=router, max_n=settings.max_n),
            )
            yield

    app = FastAPI(title="chatgate", lifespan=lifespan)
    handlers.install(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(openai_routes.router)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers,
            allow_credentials=settings.allow_credentials,
        )
    app.add_middleware(RequestIdMiddleware)
    return app
