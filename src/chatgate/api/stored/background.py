"""`background: true`: a response run after its reply, kept as it runs, cancellable.

The reply is the response `queued`, kept (committed) before it is sent. The work runs in a task
of this process, in the context of the request that asked for it, so its tokens are charged to
that key's limits as any request's are. While it runs it appends its stream events to the store
(every `FLUSH` seconds) and rewrites its record (every `HEARTBEAT` seconds) only while the
record still says it runs: a cancel on any replica marks it `cancelled` in the store, and the
runner, finding it so, stops. A runner that stops writing (its process died) is reported
`failed` after `store.STALE` seconds.

Bounded: at most `max_jobs` in this process and `max_per_key` per key (429 beyond; counted per
replica). At shutdown every job still running is cancelled and kept as `cancelled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import anyio

from chatgate.api.serving.responses import ResponsesServing, new_response_id, pending, to_chat
from chatgate.api.stored.backend import RUNNING
from chatgate.api.stored.store import Kept, ResponseStore, mark
from chatgate.errors import ChatgateError, InvalidRequestError, RateLimitExceededError
from chatgate.protocol.responses import ResponseObject, ResponsesRequest, StreamEvent

log = logging.getLogger(__name__)

FLUSH = 0.25  # seconds between appends of a running response's new events
HEARTBEAT = 1.0  # seconds between rewrites of its record (and looks for a cancel)


@dataclass
class _Job:
    """One background response as it runs."""

    request: ResponsesRequest
    whole: ResponsesRequest
    kept: Kept
    events: list[StreamEvent]
    flushed: int = 0

    @property
    def id(self) -> str:
        return self.kept.response.id


class BackgroundJobs:
    """The background responses this process runs."""

    def __init__(self, *, store: ResponseStore, serving: ResponsesServing, max_jobs: int, max_per_key: int) -> None:
        self._store = store
        self._serving = serving
        self._max_jobs = max_jobs
        self._max_per_key = max_per_key
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._per_key: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._tasks)

    def _admit(self, who: str) -> None:
        if len(self._tasks) >= self._max_jobs:
            raise RateLimitExceededError(
                f"Too many background responses running on this server ({self._max_jobs}); retry later.", retry_after=5
            )
        if self._per_key[who] >= self._max_per_key:
            raise RateLimitExceededError(
                f"Too many background responses running for this key ({self._max_per_key}); retry later.", retry_after=5
            )

    async def start(self, request: ResponsesRequest, whole: ResponsesRequest, earlier: list[dict[str, Any]], who: str) -> ResponseObject:
        """Keep `request`'s response as queued and run it after this returns it."""
        self._admit(who)
        queued = mark(pending(request, new_response_id()), request)
        kept = await self._store.keep(request, queued, earlier, who, events=[])
        if kept is None:
            raise InvalidRequestError("The conversation is too large to keep, as background requires.", param="background")
        self._admit(who)  # again: others may have started while this one was written
        job = _Job(request, whole, kept, [])
        task = asyncio.create_task(self._run(job), name=f"background {job.id}")  # in this request's context
        self._tasks[job.id] = task
        self._per_key[who] += 1

        def done(_: asyncio.Task[None]) -> None:
            self._tasks.pop(job.id, None)
            self._per_key[who] -= 1
            if self._per_key[who] <= 0:
                del self._per_key[who]

        task.add_done_callback(done)
        return queued

    async def _run(self, job: _Job) -> None:
        try:
            running = asyncio.current_task()
            assert running is not None
            beat = asyncio.create_task(self._heartbeat(job, running))
            try:
                await self._generate(job)
            finally:
                beat.cancel()
            await self._flush(job)
            final = job.kept.response
            if final.status in RUNNING:  # the stream ended without its final event
                final = final.model_copy(update={"status": "failed", "error": {"code": "server_error", "message": "The response ended unfinished."}})
            await self._store.replace(job.kept, final, only_from=RUNNING)
        except asyncio.CancelledError:
            with anyio.CancelScope(shield=True):
                await self._end(job, "cancelled", None)
            raise
        except ChatgateError as exc:
            await self._end(job, "failed", {"code": exc.code or exc.type, "message": exc.message})
        except Exception:
            log.exception("background response %s failed", job.id)
            await self._end(job, "failed", {"code": "server_error", "message": "The server had an error while processing your request."})

    async def _generate(self, job: _Job) -> None:
        """Run the response as a stream, keeping its events as they come."""
        result = await self._serving.create(to_chat(job.whole.model_copy(update={"stream": True})))
        if isinstance(result, ResponseObject):  # never: it was asked for as a stream
            raise TypeError("a streamed request answered whole")
        last = time.monotonic()
        async with contextlib.aclosing(result):
            async for event in result:
                response = getattr(event, "response", None)
                if isinstance(response, ResponseObject):
                    response = mark(response, job.request, id=job.id, background=True, created_at=job.kept.response.created_at)
                    event = event.model_copy(update={"response": response})
                    began = response.status == "in_progress" and job.kept.response.status == "queued"
                    job.kept = job.kept.with_response(response)
                    if began:  # GET says so at once, not at the next heartbeat
                        await self._store.replace(job.kept, response, only_from=RUNNING)
                job.events.append(event.model_copy(update={"sequence_number": len(job.events)}))
                if time.monotonic() - last >= FLUSH:
                    await self._flush(job)
                    last = time.monotonic()

    async def _flush(self, job: _Job) -> None:
        if len(job.events) > job.flushed:
            new = job.events[job.flushed :]
            texts = await anyio.to_thread.run_sync(lambda: [e.model_dump_json() for e in new])
            await self._store.backend.add_events(job.id, texts, job.flushed)
            job.flushed += len(new)

    async def _heartbeat(self, job: _Job, running: asyncio.Task[Any]) -> None:
        """Rewrite the record while it runs; stop the job when it no longer does (cancelled)."""
        while True:
            await anyio.sleep(HEARTBEAT)
            try:
                still = await self._store.replace(job.kept, job.kept.response, only_from=RUNNING)
            except ChatgateError:  # the store is unreachable for now: the job runs on
                continue
            if not still:
                log.info("background response %s was cancelled elsewhere", job.id)
                running.cancel()
                return

    async def _end(self, job: _Job, status: str, error: dict[str, str] | None) -> None:
        try:
            await self._flush(job)
            ended = job.kept.response.model_copy(update={"status": status, "error": error})
            await self._store.replace(job.kept, ended, only_from=RUNNING)
        except Exception:
            log.exception("could not keep background response %s as %s", job.id, status)

    async def cancel(self, response_id: str, who: str) -> ResponseObject:
        """Cancel `who`'s background response (a 400 if it is not one or has ended)."""
        kept = await self._store.get(response_id, who)
        response = kept.response
        if not response.background:
            raise InvalidRequestError("Only responses created with background can be cancelled.", param="response_id")
        if response.status == "cancelled":
            return response
        if response.status not in RUNNING:
            raise InvalidRequestError(f"Cannot cancel a response whose status is '{response.status}'.", param="response_id")
        cancelled = response.model_copy(update={"status": "cancelled"})
        if not await self._store.replace(kept, cancelled, only_from=RUNNING):
            return await self.cancel(response_id, who)  # it ended meanwhile: say how
        task = self._tasks.get(response_id)
        if task is not None:
            task.cancel()
        return cancelled

    async def close(self) -> None:
        """Cancel every job still running (each is kept as cancelled)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
