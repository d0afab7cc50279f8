"""Mixed client traffic for the soak: chat streamed and not, completions, embeddings, tools,
bad inputs and clients that leave mid-stream; every request's outcome is recorded."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from chatgate.bench.fleet import MODEL

MSG = [{"role": "user", "content": "tell me something about the sea"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@dataclass(frozen=True)
class Kind:
    """One kind of request: where it goes, what it sends, and whether it should be refused."""

    name: str
    path: str
    body: dict[str, Any] | str
    stream: bool = False
    bad: bool = False
    leave_after: int | None = None  # lines of the stream read before the client disconnects


KINDS = [
    Kind("chat", "/v1/chat/completions", {"model": MODEL, "messages": MSG, "max_tokens": 24}),
    Kind("chat_stream", "/v1/chat/completions", {"model": MODEL, "messages": MSG, "stream": True}, stream=True),
    Kind("completion", "/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16}),
    Kind("completion_stream", "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 16, "stream": True}, stream=True),
    Kind("embeddings", "/v1/embeddings", {"model": MODEL, "input": ["the sea", "the sky"]}),
    Kind("tools", "/v1/chat/completions", {"model": MODEL, "messages": MSG, "tools": [TOOL], "max_tokens": 24}),
    Kind("chat_stream", "/v1/chat/completions", {"model": MODEL, "messages": MSG, "stream": True}, stream=True),
    Kind("bad_missing_messages", "/v1/chat/completions", {"model": MODEL}, bad=True),
    Kind("bad_temperature", "/v1/chat/completions", {"model": MODEL, "messages": MSG, "temperature": 9}, bad=True),
    Kind("bad_model", "/v1/chat/completions", {"model": "no-such-model", "messages": MSG}, bad=True),
    Kind("bad_json", "/v1/completions", "{not json", bad=True),
    Kind("disconnect", "/v1/chat/completions", {"model": MODEL, "messages": MSG, "stream": True}, stream=True, leave_after=3),
]


@dataclass
class Outcome:
    """One request: when it ran, what it was, and how it ended."""

    kind: str
    route: str
    start: float
    end: float
    status: int
    outcome: str  # ok | refused (a bad input, as it should be) | left | client_error | server_error | hung | transport_error
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


async def _send(http: httpx.AsyncClient, url: str, kind: Kind) -> tuple[int, str, str]:
    """Send one request; (status, outcome, detail)."""
    content = kind.body if isinstance(kind.body, str) else json.dumps(kind.body)
    headers = {"content-type": "application/json"}
    async with http.stream("POST", f"{url}{kind.path}", content=content, headers=headers) as response:
        status = response.status_code
        if status != 200:
            detail = (await response.aread()).decode(errors="replace")[:200]
            if status >= 500:
                return status, "server_error", detail
            return status, "refused" if kind.bad else "client_error", detail
        if kind.bad:
            return status, "client_error", "a bad request was accepted"
        if not kind.stream:
            await response.aread()
            return status, "ok", ""
        lines = 0
        async for line in response.aiter_lines():
            lines += 1
            if kind.leave_after is not None and lines >= kind.leave_after:
                return status, "left", ""
            if line.startswith("data: {") and '"error"' in line[:20]:
                return status, "server_error", line[6:206]
            if line == "data: [DONE]":
                return status, "ok", ""
        return status, "server_error", "the stream ended without [DONE]"


async def one(http: httpx.AsyncClient, url: str, kind: Kind, *, deadline: float, t0: float) -> Outcome:
    """Send one request and classify how it ended; over `deadline` seconds it counts as hung."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(deadline):
            status, outcome, detail = await _send(http, url, kind)
    except TimeoutError:
        status, outcome, detail = 0, "hung", f"no end within {deadline}s"
    except httpx.HTTPError as exc:
        status, outcome, detail = 0, "transport_error", repr(exc)[:200]
    return Outcome(kind=kind.name, route=kind.path, start=start - t0, end=time.monotonic() - t0,
                   status=status, outcome=outcome, detail=detail)


async def clients(url: str, outcomes: list[Outcome], *, count: int, until: float, deadline: float, t0: float) -> None:
    """`count` closed-loop clients, each cycling through the kinds from its own offset."""
    limits = httpx.Limits(max_connections=count * 2, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        async def client(offset: int) -> None:
            for kind in itertools.islice(itertools.cycle(KINDS), offset, None):
                if time.monotonic() >= until:
                    return
                outcomes.append(await one(http, url, kind, deadline=deadline, t0=t0))

        await asyncio.gather(*(client(i * 5) for i in range(count)))
