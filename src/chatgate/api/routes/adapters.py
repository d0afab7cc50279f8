"""The admin routes that load and unload LoRA adapters (vLLM's paths and bodies), each a `Door`
and behind an admin key (`--admin-keys`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from chatgate.api.door import Door, Served
from chatgate.api.state import api_state
from chatgate.protocol.admin import AdminResult, LoadLoraAdapterRequest, UnloadLoraAdapterRequest

router = APIRouter(route_class=Door)


@router.post("/v1/load_lora_adapter", response_model=AdminResult)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> Served:
    """Serve a LoRA adapter as a model of its own, beside its base model."""
    state = api_state(request)
    state.admin.require()
    return await state.adapters.load(body)


@router.post("/v1/unload_lora_adapter", response_model=AdminResult)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> Served:
    """Stop serving a LoRA adapter; requests already running through it finish first."""
    state = api_state(request)
    state.admin.require()
    return await state.adapters.unload(body)
