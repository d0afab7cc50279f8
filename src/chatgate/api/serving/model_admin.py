"""What admins load and unload while serving, for the routes in `api/routes/model_admin.py`:
models (`/v1/models/load`, `/v1/models/unload`, `{"model": name}`) and LoRA adapters (vLLM's
`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`).

A model that can be loaded is one this process was started with (`chatgate serve`), unloaded or
not: a model is named, never a path. An adapter joins the model its `base_model_name` names,
which may be left out where one model takes adapters (`worker/served.py` picks it, for the
worker's routes too). Behind `chatgate api` the workers are other processes: each worker serves the same
routes itself (`worker/routes.py`, under the fleet key), and the controller and API servers
learn the change from its next heartbeat.
"""

from __future__ import annotations

from chatgate.api.workers.base import WorkerPool
from chatgate.api.workers.local import LocalPool
from chatgate.errors import InvalidRequestError
from chatgate.protocol.admin import AdminResult, LoadLoraAdapterRequest, ModelRequest, UnloadLoraAdapterRequest


class ModelAdminServing:
    """Loads and unloads the models and adapters of the workers in this process."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def _local(self, param: str) -> LocalPool:
        if not isinstance(self._pool, LocalPool):
            raise InvalidRequestError(
                "This API server fronts workers in other processes: ask the worker that serves the model "
                "(the same route on the worker, with the fleet key); the controller learns the change "
                "from its next heartbeat.",
                param=param,
            )
        return self._pool

    async def load_model(self, body: ModelRequest) -> AdminResult:
        """Load a model this process was started with (nothing to do if it is loaded)."""
        await self._local("model").served.load_model(body.model)
        return AdminResult(status="loaded", model=body.model)

    async def unload_model(self, body: ModelRequest) -> AdminResult:
        """Unload a model once its running requests have finished; new ones get a 404."""
        await self._local("model").served.unload_model(body.model)
        return AdminResult(status="unloaded", model=body.model)

    async def load_lora(self, body: LoadLoraAdapterRequest) -> AdminResult:
        """Serve the adapter as a model of its own beside its base; a 400 naming the problem if it cannot be."""
        await self._local("lora_name").served.load_lora(body)
        return AdminResult(status="loaded", model=body.lora_name)

    async def unload_lora(self, body: UnloadLoraAdapterRequest) -> AdminResult:
        """Stop serving the adapter once the requests running through it have finished."""
        await self._local("lora_name").served.unload_lora(body)
        return AdminResult(status="unloaded", model=body.lora_name)
