"""The admin routes that load and unload models and LoRA adapters (vLLM's paths and bodies for
adapters), each a `Door` and behind an admin key (`--admin-keys`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from chatgate.api.door import Door, Served
from chatgate.api.serving.model_admin import ModelAdminServing
from chatgate.api.state import api_state
from chatgate.protocol.admin import AdminResult, LoadLoraAdapterRequest, ModelRequest, UnloadLoraAdapterRequest

router = APIRouter(route_class=Door)


def _admin(request: Request) -> ModelAdminServing:
    state = api_state(request)
    state.admin.require()
    return state.model_admin


@router.post("/v1/models/load", response_model=AdminResult)
async def load_model(body: ModelRequest, request: Request) -> Served:
    """Load a model this server was started with."""
    return await _admin(request).load_model(body)


@router.post("/v1/models/unload", response_model=AdminResult)
async def unload_model(body: ModelRequest, request: Request) -> Served:
    """Free a model; requests already running on it finish first."""
    return await _admin(request).unload_model(body)


@router.post("/v1/load_lora_adapter", response_model=AdminResult)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> Served:
    """Serve a LoRA adapter as a model of its own, beside its base model."""
    return await _admin(request).load_lora(body)


@router.post("/v1/unload_lora_adapter", response_model=AdminResult)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> Served:
    """Stop serving a LoRA adapter; requests already running through it finish first."""
    return await _admin(request).unload_lora(body)
