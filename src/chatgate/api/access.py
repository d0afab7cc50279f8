"""The access log: one line per request, whatever route served it and however it ended.

`GuardMiddleware` opens an `AccessRecord` for every request and writes it out when the response
has ended (or the client has gone); the steps in between fill in what only they know: identity
the key's name, the serving flow the tokens, the first token's time, the worker and how many
workers were tried. The record is shared through a context variable that holds a mutable
object, so a field filled in by a child task (a streaming body) is still seen at the end.

Never in the record: the key itself, and any prompt or completion text.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("chatgate.access")

PROMPT_CHARS = 4096
# Probes and scrapes arrive every few seconds from every orchestrator: logged at debug level
# when they succeed, so the access log at info is the traffic.
PROBES = frozenset({"/health", "/ready", "/metrics"})


@dataclass
class AccessRecord:
    """What one request did, as the access line reports it."""

    request_id: str
    method: str
    path: str
    trace_id: str | None = None
    route: str | None = None
    status: int | None = None
    key: str | None = None  # the key's name in the keys file, never the key
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    total_s: float | None = None
    worker: str | None = None
    attempts: int = 0  # workers a generation was started on (more than one: it failed over)
    prompt: str | None = None  # only with --log-prompts: the request's messages, prompt or input
    keep_prompt: bool = field(default=False, repr=False)
    began: float = field(default_factory=time.perf_counter, repr=False)

    def first_token(self) -> None:
        """Note the first token's time, once."""
        if self.ttft_s is None:
            self.ttft_s = round(time.perf_counter() - self.began, 6)

    def fields(self) -> dict[str, Any]:
        """The line's fields, in a stable order."""
        out = asdict(self)
        del out["began"], out["keep_prompt"]
        if not self.keep_prompt:
            del out["prompt"]
        return out

    def note_prompt(self, body: dict[str, Any]) -> None:
        """With --log-prompts, keep the start of what the request asks the model (4,096 characters)."""
        if self.keep_prompt:
            asked = next((body[name] for name in ("messages", "prompt", "input") if name in body), None)
            self.prompt = json.dumps(asked, ensure_ascii=False)[:PROMPT_CHARS] if asked is not None else None


# The record of the request being served (None outside a request).
current: ContextVar[AccessRecord | None] = ContextVar("chatgate_access", default=None)


def record() -> AccessRecord | None:
    """The current request's record, to fill in."""
    return current.get()


def write(entry: AccessRecord) -> None:
    """Log the finished request (at info level, a probe that succeeded at debug), its fields
    attached for the formatters."""
    entry.total_s = round(time.perf_counter() - entry.began, 6)
    level = logging.DEBUG if entry.path in PROBES and (entry.status or 500) < 400 else logging.INFO
    log.log(level, "%s %s %s", entry.method, entry.path, entry.status, extra={"access": entry.fields()})
