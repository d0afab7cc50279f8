"""Batching embedding requests: inputs of concurrent requests share one engine call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from chatgate.tasks import cancel_and_wait

EmbedFn = Callable[[list[list[int]]], Awaitable[list[list[float]]]]


@dataclass(eq=False)
class _Waiting:
    inputs: list[list[int]]
    future: asyncio.Future[list[list[float]]]


class EmbeddingBatcher:
    """Queues embedding requests and runs whatever has gathered as one batch.

    While one batch runs, new requests wait together, so under load batches grow by
    themselves and idle requests never wait for a timer.
    """

    def __init__(self, embed: EmbedFn, *, max_inputs: int = 256) -> None:
        self._embed = embed
        self._max_inputs = max_inputs
        self._waiting: list[_Waiting] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def submit(self, inputs: list[list[int]]) -> list[list[float]]:
        """Vectors for `inputs`, computed in a batch with other requests."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        entry = _Waiting(inputs, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        self._wake.set()
        return await entry.future

    def _take(self) -> list[_Waiting]:
        """Whole requests up to `max_inputs` inputs (always at least one request)."""
        batch: list[_Waiting] = []
        count = 0
        while self._waiting and (not batch or count + len(self._waiting[0].inputs) <= self._max_inputs):
            entry = self._waiting.pop(0)
            if not entry.future.done():  # its caller went away
                batch.append(entry)
                count += len(entry.inputs)
        return batch

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := self._take():
                inputs = [ids for entry in batch for ids in entry.inputs]
                try:
                    vectors = await self._embed(inputs)
                except Exception as exc:
                    for entry in batch:
                        if not entry.future.done():
                            entry.future.set_exception(exc)
                    continue
                offset = 0
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_result(vectors[offset : offset + len(entry.inputs)])
                    offset += len(entry.inputs)

    async def close(self) -> None:
        """Stop the batching task."""
        await cancel_and_wait(self._task)
        self._task = None
