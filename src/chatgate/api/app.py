"""The API server app: OpenAI's HTTP API over a router of workers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.middleware.cors import CORSMiddleware

from chatgate.api import handlers
from chatgate.api.auth import KeyChecker
from chatgate.api.backends import Backend
from chatgate.api.routes import openai as openai_routes
from chatgate.api.routes import ops as ops_routes
from chatgate.api.serving.chat import ChatServing
from chatgate.api.serving.completions import CompletionServing
from chatgate.api.serving.embeddings import EmbeddingServing
from chatgate.api.serving.tokens import TokenCheckServing
from chatgate.api.state import ApiState
from chatgate.metrics import ApiMetrics, FleetCollector
from chatgate.settings import ApiSettings


def create_api_app(settings: ApiSettings, backend: Backend) -> FastAPI:
    """Build the API server; `backend` supplies the router for the app's lifetime."""

    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with backend() as router:
            fleet = FleetCollector(workers_per_model=router.readiness, worker_load=router.load)
            registry.register(fleet)
            app.state.api = ApiState(
                router=router,
                keys=KeyChecker(settings.api_keys),
                chat=ChatServing(router=router, max_n=settings.max_n, metrics=metrics),
                completions=CompletionServing(router=router, max_n=settings.max_n, metrics=metrics),
                tokens=TokenCheckServing(router=router),
                embeddings=EmbeddingServing(router=router),
            )
            try:
                yield
            finally:
                registry.unregister(fleet)

    app = FastAPI(title="chatgate", lifespan=lifespan)
    handlers.install(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(openai_routes.router)
    app.include_router(ops_routes.router(registry))
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers,
            allow_credentials=settings.allow_credentials,
        )
    app.add_middleware(handlers.GuardMiddleware, max_body=settings.max_request_bytes, metrics=metrics)
    return app
