"""Operational routes of the API server: readiness and Prometheus metrics (key-checked)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from chatgate.api.state import ApiState, api_state, require_key


def router(registry: CollectorRegistry) -> APIRouter:
    """`/ready` and `/metrics` over this app's state and registry."""
    routes = APIRouter(dependencies=[Depends(require_key)])

    @routes.get("/ready")
    async def ready(state: ApiState = Depends(api_state)) -> JSONResponse:
        """200 when every served model has a healthy worker, else 503."""
        workers = state.pool.readiness()
        ok = bool(workers) and all(count > 0 for count in workers.values())
        body = {"status": "ready" if ok else "not ready", "workers": workers}
        return JSONResponse(body, status_code=200 if ok else 503)

    @routes.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return routes
