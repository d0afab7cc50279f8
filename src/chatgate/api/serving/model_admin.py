"""What admins load and unload while serving, for the routes in `api/routes/model_admin.py`:
models (`/v1/models/load`, `/v1/models/unload`, `{"model": name}`) and LoRA adapters (vLLM's
`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`).

A model that can be loaded is one this process was started with (`chatgate serve`), unloaded or
not: a model is named, never a path. An adapter joins the first model here whose engine serves
adapters. Behind `chatgate api` the workers are other processes: each worker serves the same
routes itself (`worker/routes.py`, under the fleet key), and the controller and API servers
learn the change from its next heartbeat.
"""

from __future__ import annotations

from chatgate.api.workers.base import WorkerPool
from chatgate.api.workers.local import LocalPool
from chatgate.errors import InvalidRequestError, ModelNotFoundError
from chatgate.protocol.admin import AdminResult, LoadLoraAdapterRequest, ModelRequest, UnloadLoraAdapterRequest
from chatgate.worker.backend import WorkerBackend


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

    def _backend(self, model: str) -> WorkerBackend:
        for backend in self._local("model").backends():
            if backend.knows(model):
                return backend
        raise ModelNotFoundError.for_model(model)

    async def load_model(self, body: ModelRequest) -> AdminResult:
        """Load a model this process was started with (nothing to do if it is loaded)."""
        await self._backend(body.model).load_model()
        return AdminResult(status="loaded", model=body.model)

    async def unload_model(self, body: ModelRequest) -> AdminResult:
        """Unload a model once its running requests have finished; new ones get a 404."""
        await self._backend(body.model).unload_model()
        return AdminResult(status="unloaded", model=body.model)

    async def load_lora(self, body: LoadLoraAdapterRequest) -> AdminResult:
        """Serve the adapter as a model of its own; a 400 naming the problem if it cannot be."""
        local = self._local("lora_name")
        if body.lora_name in await local.models() or any(b.knows(body.lora_name) for b in local.backends()):
            raise InvalidRequestError(f"The model `{body.lora_name}` is already served; unload it first.", param="lora_name")
        candidates = [b for b in local.backends() if b.serves_lora() and b.model_names]
        if not candidates:
            raise InvalidRequestError("No model loaded here takes LoRA adapters (the torch engine does).", param="lora_path")
        await candidates[0].load_lora(body)
        return AdminResult(status="loaded", model=body.lora_name)

    async def unload_lora(self, body: UnloadLoraAdapterRequest) -> AdminResult:
        """Stop serving the adapter once the requests running through it have finished."""
        for backend in self._local("lora_name").backends():
            if body.lora_name in backend.lora_names():
                await backend.unload_lora(body)
                return AdminResult(status="unloaded", model=body.lora_name)
        raise ModelNotFoundError(f"The LoRA adapter `{body.lora_name}` is not loaded.", param="lora_name")
