"""Routes every chatgate process serves alike: liveness (`/health`) and Prometheus `/metrics`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def health_routes() -> APIRouter:
    """`GET /health`: 200 while the process serves HTTP (readiness is each role's `/ready`)."""
    routes = APIRouter()

    @routes.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return routes


def metrics_routes(registry: CollectorRegistry, *, dependencies: Sequence[Any] = ()) -> APIRouter:
    """`GET /metrics`: `registry` in Prometheus' text format, behind `dependencies`."""
    routes = APIRouter(dependencies=list(dependencies))

    @routes.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return routes
