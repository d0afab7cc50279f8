"""The API server app: OpenAI's HTTP API over a pool of workers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry
from starlette.middleware.cors import CORSMiddleware

from chatgate.api import errors
from chatgate.api.auth import KeyChecker
from chatgate.api.middleware import GuardMiddleware
from chatgate.api.routes import openai as openai_routes
from chatgate.api.routes import ops as ops_routes
from chatgate.api.routes import playground
from chatgate.api.serving.chat import ChatServing
from chatgate.api.serving.completions import CompletionServing
from chatgate.api.serving.embeddings import EmbeddingServing
from chatgate.api.serving.tokens import TokenCheckServing
from chatgate.api.state import ApiState, require_key
from chatgate.api.workers.base import PoolSource
from chatgate.metrics import ApiMetrics, FleetCollector
from chatgate.ops import health_routes, metrics_routes
from chatgate.settings import ApiSettings


def create_api_app(settings: ApiSettings, workers: PoolSource) -> FastAPI:
    """Build the API server; `workers` opens the worker pool for the app's lifetime."""

    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with workers() as pool:
            fleet = FleetCollector(workers_per_model=pool.readiness, worker_load=pool.load)
            registry.register(fleet)
            app.state.api = ApiState(
                pool=pool,
                keys=KeyChecker(settings.api_keys),
                chat=ChatServing(pool=pool, max_n=settings.max_n, metrics=metrics),
                completions=CompletionServing(pool=pool, max_n=settings.max_n, metrics=metrics),
                tokens=TokenCheckServing(pool=pool),
                embeddings=EmbeddingServing(pool=pool),
            )
            try:
                yield
            finally:
                registry.unregister(fleet)

    app = FastAPI(title="chatgate", lifespan=lifespan)
    errors.install(app)

    app.include_router(health_routes())
    app.include_router(metrics_routes(registry, dependencies=[Depends(require_key)]))
    app.include_router(ops_routes.router)
    app.include_router(openai_routes.router)
    if settings.playground:
        playground.mount(app)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers,
            allow_credentials=settings.allow_credentials,
        )
    app.add_middleware(GuardMiddleware, max_body=settings.max_request_bytes, metrics=metrics)
    return app
