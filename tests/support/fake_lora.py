"""A fake engine that serves LoRA adapters by name (it records them; their weights are not read),
for the routing of adapter loads between several models without a real model."""

from __future__ import annotations

from chatgate.engines.fake import FakeEngine
from chatgate.errors import ModelNotFoundError


class LoraFakeEngine(FakeEngine):
    """`FakeEngine` that takes LoRA adapters: `loaded` maps each adapter's name to its path."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.loaded: dict[str, str] = {}

    def lora_names(self) -> list[str]:
        return list(self.loaded)

    async def load_lora(self, name: str, path: str) -> None:
        self.loaded[name] = path

    async def unload_lora(self, name: str) -> None:
        if self.loaded.pop(name, None) is None:
            raise ModelNotFoundError(f"The LoRA adapter `{name}` is not loaded.", param="lora_name")
