"""Engines whose model is owned by one thread of their own (the embedding and cross-encoder
engines): loaded there at start, run there for every call, shut down at close."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, ClassVar

from chatgate.engines.base import Engine


class OneThreadEngine(Engine):
    """An engine that loads (`_load`) and runs its model in one thread, named `thread_name`."""

    thread_name: ClassVar[str] = "chatgate-engine"
    _model: Any = None
    _executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self.thread_name)
        if self._model is None:
            await self._run(self._load)

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        assert self._executor is not None, "engine not started"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _load(self) -> None:
        """Load the model (in the engine's thread)."""
        raise NotImplementedError
