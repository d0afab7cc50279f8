"""The API server app: OpenAI's HTTP API over a router of workers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from chatgate.api import handlers
from chatgate.api.auth import KeyChecker
from chatgate.api.backends import Backend
from chatgate.api.routes import openai as openai_routes
from chatgate.api.serving.chat import ChatServing
from chatgate.api.serving.completions import CompletionServing
from chatgate.api.serving.embeddings import EmbeddingServing
from chatgate.api.serving.tokens import TokenCheckServing
from chatgate.api.state import ApiState
from chatgate.settings import ApiSettings


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
                tokens=TokenCheckServing(router=router),
                embeddings=EmbeddingServing(router=router),
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
    app.add_middleware(handlers.GuardMiddleware, max_body=settings.max_request_bytes)
    return app
