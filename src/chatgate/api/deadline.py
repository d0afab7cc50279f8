"""A client's own deadline: `x-request-timeout: <seconds>` caps the whole request.

The door reads the header before the body and runs everything after it (admission, the route's
work, and a stream to its last event) under one deadline. A response not yet started when it
passes is a 504 `request_timeout`; a stream already flowing ends with that error as its last
event. Either way the generation is cancelled, so the worker stops, and what it used is charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request

from chatgate.errors import InvalidRequestError, RequestTimeoutError

T = TypeVar("T")
B = TypeVar("B")

HEADER = "x-request-timeout"
MAX_SECONDS = 24 * 3600.0  # longer than any request we serve; a bigger value is a client's mistake


@dataclass(frozen=True)
class Deadline:
    """When a request must have ended, on the event loop's clock, and the seconds it was given."""

    at: float
    seconds: float

    def expired(self) -> RequestTimeoutError:
        """The error for a request that ran past it."""
        return RequestTimeoutError(f"The request did not finish within the {self.seconds:g} seconds its {HEADER} header allowed.")


def requested_deadline(request: Request) -> Deadline | None:
    """The request's deadline, or None; a 400 for a value that is not one positive number of
    seconds (at most a day), or for the header given twice."""
    values = request.headers.getlist(HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequestError(f"The {HEADER} header was given more than once.", param=HEADER)
    try:
        seconds = float(values[0])
    except ValueError:
        seconds = math.nan
    if not (0 < seconds <= MAX_SECONDS):  # also false for NaN
        raise InvalidRequestError(
            f"Invalid value for the {HEADER} header: a number of seconds above 0 and at most {MAX_SECONDS:g} "
            f"is expected, got {values[0][:40]!r}.", param=HEADER,
        )
    return Deadline(at=asyncio.get_running_loop().time() + seconds, seconds=seconds)


async def within(deadline: Deadline | None, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it with a 504 if the deadline passes first."""
    if deadline is None:
        return await work
    try:
        async with asyncio.timeout_at(deadline.at):
            return await work
    except TimeoutError:
        raise deadline.expired() from None


async def stream_within(deadline: Deadline, chunks: AsyncGenerator[B, None]) -> AsyncGenerator[B, None]:
    """Pass `chunks` through until the deadline; then close them (cancelling the generation) and
    raise the 504, which the stream's encoder sends as its last event."""
    async with contextlib.aclosing(chunks):
        while True:
            try:
                async with asyncio.timeout_at(deadline.at):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise deadline.expired() from None
            yield chunk
