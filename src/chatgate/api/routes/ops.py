"""The API server's readiness route (key-checked in middleware; what it shows depends on the
key, see `chatgate.api.admin`); `/health` and `/metrics` are `chatgate.ops`'s."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from chatgate.api.limits import grant as limits
from chatgate.api.state import ApiState, api_state

router = APIRouter()


@router.get("/ready")
async def ready(state: ApiState = Depends(api_state)) -> JSONResponse:
    """200 when every served model has a healthy worker (`degraded` if the worker table may be
    stale), else 503. A key that is not an admin's sees, and is answered for, only the models
    it may use; a probe without a key (when keys are checked) gets the status alone."""
    workers = state.pool.readiness()
    if not state.admin.is_admin():
        workers = {model: count for model, count in workers.items() if limits.allows(model)}
    ok = bool(workers) and all(count > 0 for count in workers.values())
    degraded = state.pool.degraded()
    body: dict[str, object] = {"status": "not ready" if not ok else "degraded" if degraded else "ready", "workers": workers}
    if degraded:
        body["reason"] = degraded
    if state.admin.is_anonymous():
        body = {"status": body["status"]}
    return JSONResponse(body, status_code=200 if ok else 503)
