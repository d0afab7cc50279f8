"""The LoRA adapters one engine serves, by name: loading, per-adapter use counts, draining.

An adapter is read and checked in a worker thread before it is added, so a bad path or an
adapter for another base model fails its own load only; the runner serves it from the moment it
is added. Unloading first stops new requests naming it, then waits until every sequence already
running through it has finished, and only then removes its weights (a drain per adapter).
Everything but the reading runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from chatgate.engines.lora import AdapterError, checked_name
from chatgate.engines.runners.base import Runner
from chatgate.errors import ModelNotFoundError

log = logging.getLogger(__name__)


class ServedAdapters:
    """Adapters served beside a base model named `base`, over `runner`."""

    def __init__(self, runner: Runner, *, base: str) -> None:
        self.runner: Runner | None = runner  # None while the model is unloaded
        self._base = base
        self._paths: dict[str, Path] = {}
        self._in_use: Counter[str] = Counter()
        self._changed = asyncio.Event()

    def detach(self) -> None:
        """The model is being freed: let go of its runner, keep the names and paths."""
        self.runner = None

    async def attach(self, runner: Runner) -> None:
        """The model is loaded again: read every adapter again onto its new runner."""
        self.runner = runner
        for name, path in list(self._paths.items()):
            adapter = await asyncio.to_thread(runner.read_adapter, name, path)
            runner.add_adapter(adapter)

    def names(self) -> list[str]:
        """The adapters served now, in the order they were loaded."""
        return list(self._paths)

    def path(self, name: str) -> Path | None:
        """Where adapter `name` was read from (None: not served)."""
        return self._paths.get(name)

    async def load(self, name: str, path: Path) -> None:
        """Read `path` and serve it as `name`; an `AdapterError` (400) if it cannot be served."""
        checked_name(name)
        if name in self._paths or name == self._base:
            raise AdapterError(f"The model `{name}` is already served; unload it first.", param="lora_name")
        if name in self._in_use:  # its old weights still serve running requests
            raise AdapterError(f"The LoRA adapter `{name}` is still being unloaded; try again shortly.", param="lora_name")
        runner = self.runner
        if runner is None:
            raise AdapterError(f"LoRA adapter {name!r}: its base model is not loaded; load it first.", param="lora_name")
        try:
            adapter = await asyncio.to_thread(runner.read_adapter, name, path)
        except MemoryError:  # what is served already keeps its memory; this adapter is refused
            raise AdapterError(f"LoRA adapter {name!r}: out of memory while reading {str(path)!r}") from None
        if name in self._paths:  # another load of the same name finished while this one read
            raise AdapterError(f"The model `{name}` is already served; unload it first.", param="lora_name")
        runner.add_adapter(adapter)
        self._paths[name] = path
        log.info("serving LoRA adapter %s from %s", name, path)

    async def unload(self, name: str) -> None:
        """Stop serving `name`: refuse new requests at once, remove its weights once its running
        requests have finished."""
        if name not in self._paths:
            raise ModelNotFoundError(f"The LoRA adapter `{name}` is not loaded.", param="lora_name")
        del self._paths[name]
        while self._in_use[name] and name not in self._paths:
            self._changed.clear()
            await self._changed.wait()
        if name not in self._paths and self.runner is not None:  # not loaded again meanwhile under the same name
            self.runner.remove_adapter(name)
        log.info("unloaded LoRA adapter %s", name)

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[None]:
        """Hold adapter `name` for one request (a 404 if it is not served)."""
        if name not in self._paths:
            raise ModelNotFoundError.for_model(name)
        self._in_use[name] += 1
        try:
            yield
        finally:
            self._in_use[name] -= 1
            if not self._in_use[name]:
                del self._in_use[name]
                self._changed.set()
