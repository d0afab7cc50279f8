"""The API server app: OpenAI's HTTP API over a pool of workers."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from opentelemetry.trace import TracerProvider
from starlette.routing import BaseRoute
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector
from starlette.middleware.cors import CORSMiddleware

from chatgate.api import errors
from chatgate.api.admin import AdminKeys
from chatgate.api.auth import IdentityMiddleware, KeyChecker
from chatgate.api.door import BodyAdmission, Door
from chatgate.api.errors import OPENAI, ErrorDialects
from chatgate.api.limits.lease import LeaseKeeper
from chatgate.api.limits.middleware import RateLimitMiddleware
from chatgate.api.limits.policy import load_keys_file
from chatgate.api.limits.scoped import KeyScopedPool
from chatgate.api.limits.store import LimitStore, MemoryStore
from chatgate.api.middleware import GuardMiddleware
from chatgate.api.routes import model_admin as model_admin_routes
from chatgate.api.routes import anthropic as anthropic_routes
from chatgate.api.routes import openai as openai_routes
from chatgate.api.routes import ops as ops_routes
from chatgate.api.routes import playground
from chatgate.api.routes import scoring as scoring_routes
from chatgate.api.serving.model_admin import ModelAdminServing
from chatgate.api.serving.chat import ChatServing
from chatgate.api.serving.completions import CompletionServing
from chatgate.api.serving.embeddings import EmbeddingServing
from chatgate.api.serving.messages import MessagesServing, TokenCountServing
from chatgate.api.serving.responses import ResponsesServing
from chatgate.api.serving.scoring import ScoringServing
from chatgate.api.serving.tokenize import TokenizeServing
from chatgate.api.serving.tokens import TokenCheckServing
from chatgate.api.state import ApiState
from chatgate.api.stored.background import BackgroundJobs
from chatgate.api.stored.opening import open_store
from chatgate.api.stored.store import ResponseStore
from chatgate.api.workers.base import PoolSource, WorkerPool
from chatgate.api.workers.draining import DrainingPool
from chatgate.drain import Drain
from chatgate.metrics import ApiMetrics, FleetCollector
from chatgate.ops import health_routes, metrics_routes
from chatgate.settings import ApiSettings
from chatgate.tracing import SERVICE_API, TraceMiddleware, Tracing


def _limit_store(redis_url: str | None) -> LimitStore:
    """Per-key counters: in Redis when a URL is given (shared by replicas), else in memory."""
    if not redis_url:
        return MemoryStore()
    # Imported only here: Redis is needed only with --redis-url, and some environments
    # (the vLLM venv) run chatgate without it.
    from chatgate.api.limits.redis_store import RedisStore

    return RedisStore(redis_url)


def create_api_app(
    settings: ApiSettings, workers: PoolSource, *, tracer_provider: TracerProvider | None = None
) -> FastAPI:
    """Build the API server; `workers` opens the worker pool for the app's lifetime. Spans go to
    `tracer_provider` if given (its owner shuts it down), else where the settings say."""

    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    policies = load_keys_file(settings.api_keys_file) if settings.api_keys_file else {}
    store = _limit_store(settings.redis_url)
    drain = Drain(timeout=settings.shutdown_timeout)
    leases = LeaseKeeper(store)
    keys = KeyChecker(settings.api_keys, policies, admin=settings.admin_keys)
    admin = AdminKeys(keys_checked=keys.required)
    tracing = Tracing.of(service=SERVICE_API, endpoint=settings.otlp_endpoint, provider=tracer_provider)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Each thing opened is closed in reverse order, however far the start got.
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(asyncio.to_thread, tracing.close)  # the last spans are flushed before the process ends
            opened = await stack.enter_async_context(workers())
            stack.push_async_callback(store.close)
            stack.push_async_callback(leases.close)
            served = DrainingPool(opened, drain)
            pool = KeyScopedPool(served) if any(p.models is not None for p in policies.values()) else served
            # Every model and worker (addresses, in a fleet): /metrics is for admins only.
            fleet = FleetCollector(workers_per_model=pool.readiness, worker_load=pool.load)
            # A pool of workers in this process (`chatgate serve`) also shows what they meter.
            local: list[Collector] = getattr(opened, "collectors", list)()
            for collector in [fleet, *local]:
                registry.register(collector)
                stack.callback(registry.unregister, collector)
            stored = await open_store(settings)
            stack.push_async_callback(stored.close)
            state = app.state.api = _serving(settings, pool, opened, stored, metrics, admin)
            stack.push_async_callback(state.background.close)  # before the store: cancelled jobs are kept as such
            yield

    # The interactive docs describe every route: off unless asked for, and then behind the key.
    docs = settings.docs
    app = FastAPI(
        title="chatgate",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.drain = drain  # the CLI's server drains it on SIGTERM
    app.state.admission = BodyAdmission()  # where the door checks bodies
    errors.install(app)

    app.include_router(health_routes())
    app.include_router(metrics_routes(registry, dependencies=[Depends(admin.require)]))
    for router in (ops_routes.router, openai_routes.router, anthropic_routes.router, scoring_routes.router,
                   model_admin_routes.router):
        app.include_router(router)
    if settings.playground:
        playground.mount(app)
    check_doors(app)
    app.state.error_dialects = error_dialects(app)
    _stack_middleware(app, settings, keys=keys, limits=(store, leases) if policies else None, metrics=metrics,
                      tracing=tracing)
    return app


def _stack_middleware(
    app: FastAPI, settings: ApiSettings, *, keys: KeyChecker, limits: tuple[LimitStore, LeaseKeeper] | None,
    metrics: ApiMetrics, tracing: Tracing,
) -> None:
    """The ASGI layers every request passes before routing. Outermost last: the trace (so the
    access line names it), Guard (ids, size cap, 500s), CORS (preflights; its headers on every
    error below), identity (the one parsed caller), then the caller's limits (`limits` is the
    counters' store and leases, where keys have policies)."""
    if limits is not None:
        store, leases = limits
        app.add_middleware(RateLimitMiddleware, store=store, leases=leases)
    app.add_middleware(IdentityMiddleware, keys=keys, public=_public_paths(settings))
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers,
            allow_credentials=settings.allow_credentials,
        )
    app.add_middleware(GuardMiddleware, max_body=settings.max_request_bytes, metrics=metrics, log_prompts=settings.log_prompts)
    app.add_middleware(TraceMiddleware, tracing=tracing)


def _serving(
    settings: ApiSettings, pool: WorkerPool, opened: WorkerPool, stored: ResponseStore, metrics: ApiMetrics,
    admin: AdminKeys,
) -> ApiState:
    """Every route's serving object over the opened pool (`pool` is it as the routes see it:
    draining, and scoped to a key's models where keys are), for the app's lifetime."""
    responses = ResponsesServing(pool=pool, max_n=settings.max_n, metrics=metrics)
    return ApiState(
        pool=pool,
        admin=admin,
        stream_write_timeout=settings.stream_write_timeout,
        chat=ChatServing(pool=pool, max_n=settings.max_n, metrics=metrics),
        completions=CompletionServing(pool=pool, max_n=settings.max_n, metrics=metrics),
        responses=responses,
        tokens=TokenCheckServing(pool=pool),
        embeddings=EmbeddingServing(pool=pool),
        tokenizer=TokenizeServing(pool=pool),
        messages=MessagesServing(pool=pool, max_n=settings.max_n, metrics=metrics),
        token_counts=TokenCountServing(pool=pool),
        scoring=ScoringServing(pool=pool),
        stored=stored,
        background=BackgroundJobs(
            store=stored, serving=responses, max_jobs=settings.responses_max_background,
            max_per_key=settings.responses_max_background_per_key,
        ),
        model_admin=ModelAdminServing(opened),
    )


# Routes that take no body and answer from the process's own state: liveness, readiness and
# metrics. Identity (and so `--api-keys`) still applies to all but `/health`.
_OPS_PATHS = frozenset({"/health", "/ready", "/metrics"})


def all_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, those of included routers too (FastAPI includes routers lazily)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from all_routes(inner.routes)
        else:
            yield route


def check_doors(app: FastAPI) -> None:
    """Refuse to build an app with an API route that does not pass the door."""
    for route in all_routes(app.routes):
        if not isinstance(route, APIRoute) or route.path in _OPS_PATHS or playground.is_playground_path(route.path):
            continue
        if not isinstance(route, Door):
            raise TypeError(f"route {route.path} is not declared through the door (chatgate.api.door.Door)")


def error_dialects(app: FastAPI) -> ErrorDialects:
    """The routes whose door speaks another API's errors than OpenAI's, for errors answered
    before routing (a missing key, a rate limit, a body too large), and the paths under them
    (`/v1/messages/batches`, which that API's clients call, is answered in its dialect too)."""
    doors = [route for route in all_routes(app.routes) if isinstance(route, Door) and route.error_dialect is not OPENAI]
    under = [(re.compile(f"^{re.escape(door.path)}/"), door.error_dialect) for door in doors if "{" not in door.path]
    return ErrorDialects([*((door.path_regex, door.error_dialect) for door in doors), *under])


def _public_paths(settings: ApiSettings) -> Callable[[str], bool]:
    """Which paths answer without a key: liveness, and the playground page when it is served."""

    def public(path: str) -> bool:
        return path == "/health" or (settings.playground and playground.is_playground_path(path))

    return public
