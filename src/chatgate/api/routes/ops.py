"""The API server's readiness route (key-checked in middleware); `/health` and `/metrics` are
`chatgate.ops`'s."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from chatgate.api.state import ApiState, api_state

router = APIRouter()


@router.get("/ready")
async def ready(state: ApiState = Depends(api_state)) -> JSONResponse:
    """200 when every served model has a healthy worker (`degraded` if the worker table may be
    stale), else 503."""
    workers = state.pool.readiness()
    ok = bool(workers) and all(count > 0 for count in workers.values())
    degraded = state.pool.degraded()
    body: dict[str, object] = {"status": "not ready" if not ok else "degraded" if degraded else "ready", "workers": workers}
    if degraded:
        body["reason"] = degraded
    return JSONResponse(body, status_code=200 if ok else 503)
