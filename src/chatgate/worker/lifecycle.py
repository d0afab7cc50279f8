"""Whether a worker's model is loaded: `/v1/models/load` and `/v1/models/unload`, and
`--idle-unload`.

Three states:
- loaded: requests run;
- unloaded (by an admin): its names leave the worker's status, so the controller and every API
  server stop routing to it within a heartbeat; a request that still arrives is a 404;
- idle (freed by `--idle-unload` after that many seconds without a request): its names stay
  listed, and the next request loads it again and waits for the load.
Unloading (either way) first refuses new requests, then waits until the requests already
running on the model have finished (a drain per model), and only then frees it. Loads and
unloads of one model run one at a time. All of this runs on the event loop; the engine loads in
its own threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Literal

from chatgate.engines.base import Engine
from chatgate.engines.memory import MemoryGuard
from chatgate.errors import InsufficientMemoryError, ModelNotFoundError

log = logging.getLogger(__name__)

State = Literal["loaded", "unloaded", "idle"]


def _is_out_of_memory(exc: RuntimeError) -> bool:
    """Whether `exc` is an allocator's out-of-memory error: `torch.OutOfMemoryError` (CUDA), or
    the RuntimeError torch's CPU allocator raises ("can't allocate memory")."""
    torch = sys.modules.get("torch")  # not loaded: no torch allocation could have failed
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "allocate memory" in text


async def start_engine(engine: Engine, *, name: str) -> None:
    """Start (load) `engine`; a load that runs out of memory frees what it had taken and is an
    `InsufficientMemoryError` (409) naming the model `name`, leaving every other model as it was."""
    try:
        await engine.start()
    except MemoryError:
        detail = ""
    except RuntimeError as exc:
        if not _is_out_of_memory(exc):
            raise
        detail = f" ({exc})"
    else:
        return
    await engine.unload()
    raise InsufficientMemoryError(
        f"Loading the model `{name}` ran out of memory{detail}; free memory (unload another model, or run "
        "fewer models in this process) and load it again.", param="model"
    )


class ModelLifecycle:
    """Loads and frees `engine` as admins ask and as requests come and go."""

    def __init__(
        self, engine: Engine, *, name: str, idle_unload: float | None = None, guard: MemoryGuard | None = None
    ) -> None:
        self._engine = engine
        self._guard = guard  # checks that a load fits before it starts (None: no check)
        self._name = name
        self._idle_unload = idle_unload
        self.state: State = "loaded"
        self._in_use = 0
        self._last_used = time.monotonic()
        self._switch = asyncio.Lock()  # one load or unload at a time
        self._drained = asyncio.Event()
        self._unloading: set[asyncio.Future[None]] = set()  # unloads carried on after their caller left
        self.last_load_seconds: float | None = None  # how long the latest load on demand took

    @property
    def listed(self) -> bool:
        """Whether the model's names are advertised (not unloaded by an admin)."""
        return self.state != "unloaded"

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[None]:
        """Hold the model loaded for one request, loading it first if it sits idle."""
        if self.state == "unloaded":
            raise ModelNotFoundError.for_model(self._name)
        if self.state != "loaded" or self._switch.locked():
            await self._ready()
        self._in_use += 1  # no await since `_ready`: the model is loaded here
        try:
            yield
        finally:
            self._in_use -= 1
            self._last_used = time.monotonic()
            if not self._in_use:
                self._drained.set()

    async def _ready(self) -> None:
        """Wait for a load or unload under way, then load the model if it sits idle (the
        request's first token waits for this)."""
        async with self._switch:
            if self.state == "idle":
                began = time.monotonic()
                await self._start()
                self.state = "loaded"
                self.last_load_seconds = time.monotonic() - began
                log.info("loaded %s again on demand in %.1f s", self._name, self.last_load_seconds)
            elif self.state == "unloaded":
                raise ModelNotFoundError.for_model(self._name)

    async def load(self) -> None:
        """Load the model (an admin's `/v1/models/load`); nothing to do if it is loaded."""
        async with self._switch:
            if self.state != "loaded":
                await self._start()
                self.state = "loaded"
                log.info("loaded %s", self._name)

    async def _start(self) -> None:
        """Start the engine once its estimated need fits (`engines/memory.py`): a load refused
        so is a 409 naming the model, as is one that runs out of memory anyway (`start_engine`)."""
        if self._guard is None:
            await start_engine(self._engine, name=self._name)
            return
        async with self._guard.admitting(f"the model `{self._name}`", self._engine.memory_need):
            await start_engine(self._engine, name=self._name)

    async def unload(self, *, to: State = "unloaded") -> None:
        """Refuse new requests (`unloaded`) or keep taking them (`idle`: they load it again),
        wait for the running ones, then free the model. Carried through if the caller leaves
        (an admin's client timing out while requests drain): else the model would be marked
        unloaded, refusing requests, yet never freed."""
        task = asyncio.ensure_future(self._unload(to))
        self._unloading.add(task)
        task.add_done_callback(self._unloading.discard)
        await asyncio.shield(task)

    async def _unload(self, to: State) -> None:
        async with self._switch:
            if self.state != "loaded":
                self.state = "unloaded" if to == "unloaded" else self.state
                return
            if to == "unloaded":
                self.state = "unloaded"
            while self._in_use:
                if to == "idle":
                    return  # a request came: the model is not idle after all
                self._drained.clear()
                await self._drained.wait()
            await self._engine.unload()
            self.state = to
            log.info("unloaded %s (%s)", self._name, to)

    async def close(self) -> None:
        """Stop the unloads still under way (the engine is closed next, which frees it anyway)."""
        for task in list(self._unloading):
            task.cancel()
        await asyncio.gather(*self._unloading, return_exceptions=True)

    async def watch_idle(self) -> None:
        """Free the model whenever no request has used it for `--idle-unload` seconds (runs until cancelled)."""
        if self._idle_unload is None:
            return
        while True:
            await asyncio.sleep(min(self._idle_unload, 1.0))
            idle_for = time.monotonic() - self._last_used
            if self.state == "loaded" and not self._in_use and idle_for >= self._idle_unload:
                await self.unload(to="idle")
