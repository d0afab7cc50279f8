"""Loading and unloading LoRA adapters while serving (vLLM's `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter`), for the admin routes in `api/routes/adapters.py`.

An adapter joins the workers in this process (`chatgate serve`): the first model whose engine
serves adapters and that the adapter fits. Behind `chatgate api` the workers are other
processes: each worker serves the same two routes itself (`worker/routes.py`, under the fleet
key), and the controller and API servers learn the new model names from its next heartbeat.
"""

from __future__ import annotations

from chatgate.api.workers.base import WorkerPool
from chatgate.api.workers.local import LocalPool
from chatgate.errors import InvalidRequestError, ModelNotFoundError
from chatgate.protocol.admin import AdminResult, LoadLoraAdapterRequest, UnloadLoraAdapterRequest


class AdapterServing:
    """Adds adapters to, and removes them from, the workers in this process."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def _local(self) -> LocalPool:
        if not isinstance(self._pool, LocalPool):
            raise InvalidRequestError(
                "This API server fronts workers in other processes: load or unload the adapter at the "
                "worker that serves its base model (POST /v1/load_lora_adapter on the worker, with the "
                "fleet key); the controller learns the new model from its next heartbeat.",
                param="lora_name",
            )
        return self._pool

    async def load(self, body: LoadLoraAdapterRequest) -> AdminResult:
        """Serve the adapter as a model of its own; a 400 naming the problem if it cannot be."""
        local = self._local()
        if body.lora_name in await local.models():
            raise InvalidRequestError(f"The model `{body.lora_name}` is already served; unload it first.", param="lora_name")
        candidates = [b for b in local.backends() if b.serves_lora()]
        if not candidates:
            raise InvalidRequestError("No model served here takes LoRA adapters (the torch engine does).", param="lora_path")
        await candidates[0].load_lora(body)
        return AdminResult(status="loaded", model=body.lora_name)

    async def unload(self, body: UnloadLoraAdapterRequest) -> AdminResult:
        """Stop serving the adapter once the requests running through it have finished."""
        for backend in self._local().backends():
            if body.lora_name in backend.lora_names():
                await backend.unload_lora(body)
                return AdminResult(status="unloaded", model=body.lora_name)
        raise ModelNotFoundError(f"The LoRA adapter `{body.lora_name}` is not loaded.", param="lora_name")
