"""The models one process serves (`chatgate worker`, `chatgate serve`), found by name.

Each model is a `WorkerBackend` with an engine, queue and threads of its own. Names are read on
each use, never cached: a backend's names change as LoRA adapters load and unload, and drop out
while an admin has unloaded its model. Loading and unloading by name are here too, so the
worker's routes and `chatgate serve`'s admin routes pick a backend the same way.
"""

from __future__ import annotations

from chatgate.errors import InvalidRequestError, ModelNotFoundError, StartupError
from chatgate.protocol.admin import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from chatgate.protocol.worker import WorkerStatus
from chatgate.worker.backend import WorkerBackend

BASE_PARAM = "base_model_name"  # vLLM's name for an adapter's base model (`LoRAModulePath`)


class ServedModels:
    """The backends of one process, by model name (an adapter's name leads to its base's backend)."""

    def __init__(self, backends: list[WorkerBackend]) -> None:
        seen: set[str] = set()
        for backend in backends:
            for name in backend.model_names:
                if name in seen:  # the embedding model's default name, or a name given twice
                    raise StartupError(f"two models are served under the name {name!r}: give one of them --model-names")
                seen.add(name)
        self._backends = list(backends)
        # Adapter names whose load is under way: two loads of one name beside different bases
        # would both pass the check below before either finished, and serve the name twice.
        self._loading: set[str] = set()

    def backends(self) -> list[WorkerBackend]:
        """The backends, in the order they were given."""
        return list(self._backends)

    @property
    def model_names(self) -> list[str]:
        """Every name served now: each model's own, then its adapters'."""
        return [name for backend in self._backends for name in backend.model_names]

    def by_name(self) -> dict[str, WorkerBackend]:
        """The backend behind each name served now."""
        return {name: backend for backend in self._backends for name in backend.model_names}

    def owner(self, model: str) -> WorkerBackend | None:
        """The backend whose own model `model` names (loaded or not; never an adapter's name)."""
        return next((b for b in self._backends if b.knows(model)), None)

    def find(self, model: str) -> WorkerBackend | None:
        """The backend serving `model` now (a model or an adapter), or whose own model it is."""
        return self.by_name().get(model) or self.owner(model)

    def named(self, model: str) -> WorkerBackend:
        """The backend serving `model`; 404 if no backend here has that name."""
        backend = self.find(model)
        if backend is None:
            raise ModelNotFoundError.for_model(model)
        return backend

    def _own(self, model: str) -> WorkerBackend:
        backend = self.owner(model)
        if backend is None:
            raise ModelNotFoundError.for_model(model)
        return backend

    def backend_for(self, model: str | None) -> WorkerBackend:
        """The backend a request's `model` goes to. With one model served, any or no name is
        that model's (as a FastChat worker takes it); with several, the name must be one of them."""
        if len(self._backends) == 1:
            return self._backends[0]
        if not model:
            raise InvalidRequestError(
                f"This worker serves several models: name one in `model` ({', '.join(self.model_names)}).", param="model"
            )
        return self.named(model)

    def status(self) -> WorkerStatus:
        """What the process reports to the controller: every name, and the queues' sum."""
        return WorkerStatus(model_names=self.model_names, speed=1.0,
                            queue_length=sum(backend.status().queue_length for backend in self._backends))

    def load(self) -> tuple[int, int]:
        """Requests in flight, and sequences running or queued, over every model."""
        loads = [backend.load() for backend in self._backends]
        return sum(a for a, _ in loads), sum(b for _, b in loads)

    async def load_model(self, model: str) -> None:
        """Load the model named `model` (one this process was started with)."""
        await self._own(model).load_model()

    async def unload_model(self, model: str) -> None:
        """Free the model named `model` once its running requests finish; the others keep serving."""
        await self._own(model).unload_model()

    async def load_lora(self, params: LoadLoraAdapterRequest) -> None:
        """Serve an adapter beside the base model `base_model_name` names (which may be left out
        when one model here takes adapters); an adapter made for another base is the engine's 400."""
        if self.find(params.lora_name) is not None or params.lora_name in self._loading:
            raise InvalidRequestError(f"The model `{params.lora_name}` is already served; unload it first.", param="lora_name")
        base = self._lora_base(params.base_model_name)
        if not base.model_names:
            raise InvalidRequestError(
                "The adapter's base model is unloaded: load it before its adapters.", param=BASE_PARAM
            )
        self._loading.add(params.lora_name)
        try:
            await base.load_lora(params)
        finally:
            self._loading.discard(params.lora_name)

    def _lora_base(self, name: str | None) -> WorkerBackend:
        if name is not None:
            base = self.owner(name)
            if base is None:
                raise ModelNotFoundError(f"The base model `{name}` is not served here.", param=BASE_PARAM)
            if not base.serves_lora():
                raise InvalidRequestError(
                    f"The model `{name}` takes no LoRA adapters (the torch and llama.cpp engines' chat models do).",
                    param=BASE_PARAM,
                )
            return base
        capable = [b for b in self._backends if b.serves_lora()]
        if not capable:
            raise InvalidRequestError("No model served here takes LoRA adapters (the torch engine does).", param="lora_path")
        if len(capable) > 1:
            names = ", ".join(n for b in capable for n in b.model_names[:1])
            raise InvalidRequestError(
                f"Several models here take LoRA adapters: name the adapter's base in `{BASE_PARAM}` ({names}).",
                param=BASE_PARAM,
            )
        return capable[0]

    async def unload_lora(self, params: UnloadLoraAdapterRequest) -> None:
        """Stop serving the adapter once the requests running through it have finished."""
        for backend in self._backends:
            if params.lora_name in backend.lora_names():
                await backend.unload_lora(params)
                return
        raise ModelNotFoundError(f"The LoRA adapter `{params.lora_name}` is not loaded.", param="lora_name")
