"""The API server's readiness route (key-checked in middleware); `/health` and `/metrics` are
`chatgate.ops`'s."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from chatgate.api.state import ApiState, api_state

router = APIRouter()


@router.get("/ready")
async def ready(state: ApiState = Depends(api_state)) -> JSONResponse:
    """200 when every served model has a healthy worker, else 503."""
    workers = state.pool.readiness()
    ok = bool(workers) and all(count > 0 for count in workers.values())
    body = {"status": "ready" if ok else "not ready", "workers": workers}
    return JSONResponse(body, status_code=200 if ok else 503)
