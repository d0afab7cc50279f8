"""Bodies of the admin routes that change what is served: models by name (`/v1/models/load`,
`/v1/models/unload`), LoRA adapters as vLLM's server takes them (`/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`), and the answer they share."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from chatgate.protocol.limits import PublicRequest

# A model name's bound on the worker protocol (`MAX_MODEL_NAME_LENGTH`) is wider; adapter names
# are kept to what `engines.lora.checked_name` accepts.
MAX_LORA_NAME = 128
MAX_PATH = 4096
MAX_MODEL_NAME = 256  # the worker protocol's bound


class ModelRequest(PublicRequest):
    """Load or unload the model `model` (one the server was started with)."""

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)


class LoadLoraAdapterRequest(PublicRequest):
    """Serve the adapter at `lora_path` as the model `lora_name` (vLLM's body), beside the base
    model `base_model_name` (vLLM's name for it in `--lora-modules`): needed only where several
    models take adapters."""

    lora_name: str = Field(min_length=1, max_length=MAX_LORA_NAME)
    lora_path: str = Field(min_length=1, max_length=MAX_PATH)
    base_model_name: str | None = Field(None, min_length=1, max_length=MAX_MODEL_NAME)


class UnloadLoraAdapterRequest(PublicRequest):
    """Stop serving the adapter `lora_name` (vLLM's body; its `lora_int_id` is not needed)."""

    lora_name: str = Field(min_length=1, max_length=MAX_LORA_NAME)


class AdminResult(BaseModel):
    """What an admin route did."""

    object: Literal["admin.result"] = "admin.result"
    status: Literal["loaded", "unloaded"]
    model: str
