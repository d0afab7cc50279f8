"""Translation between chatgate's worker protocol and an OpenAI-compatible upstream's API.

Requests: `GenerateParams` become `/chat/completions` (with `messages`) or `/completions` bodies,
always streamed with usage. Responses: the upstream's SSE events become delta `WorkerChunk`s; tool
calls are turned into the JSON text the API server's tool plan parses (so its tool handling is
the same for every worker). Errors: the upstream's status picks the chatgate error, so a 4xx
reaches the client as that 4xx and a 5xx counts as the worker being unavailable; a 401 or 403
is the operator's credentials failing, a 502 to the client. This is where the upstream's words
become a client's: what is passed on is scrubbed of the operator's secrets (`Secrets`), and the
full story goes to the log.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from chatgate.errors import (
    ChatgateError,
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    RequestTooLargeError,
    WorkerError,
    WorkerUnavailableError,
)
from chatgate.protocol.worker import (
    GenerateParams,
    PromptLogprob,
    TokenAlternative,
    WorkerChunk,
    WorkerLogprob,
    WorkerUsage,
    finish_reason_of,
)

log = logging.getLogger(__name__)

_BY_STATUS: dict[int, type[ChatgateError]] = {
    400: InvalidRequestError,
    404: ModelNotFoundError,
    413: RequestTooLargeError,
    422: InvalidRequestError,
    429: OverloadedError,
}

# Sampling fields OpenAI does not define: sent only when set, since strict upstreams reject them.
_EXTRA_DEFAULTS: dict[str, Any] = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}


def _sampling(params: GenerateParams, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    optional = {
        "presence_penalty": params.presence_penalty or None,
        "frequency_penalty": params.frequency_penalty or None,
        "logit_bias": {str(k): v for k, v in params.logit_bias.items()} if params.logit_bias else None,
        "stop": params.stop_list() or None,
        "seed": params.seed,
        "max_tokens": params.max_new_tokens,
        "stop_token_ids": params.stop_token_ids or None,
        "priority": params.priority or None,  # vLLM's; the upstream decides whether it schedules by it
    }
    body |= {k: v for k, v in optional.items() if v is not None}
    body |= {k: getattr(params, k) for k, default in _EXTRA_DEFAULTS.items() if getattr(params, k) != default}
    return body


def _constraint_fields(constraint: dict[str, Any]) -> dict[str, Any]:
    """The body field for the worker protocol's constraint form: OpenAI's `response_format` for
    JSON, vLLM's `structured_outputs` for a regex, choice or grammar (which OpenAI has not)."""
    kind = constraint.get("type")
    if kind in ("regex", "choice", "grammar"):
        return {"structured_outputs": {kind: constraint.get(kind)}}
    if kind == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "response", "schema": constraint.get("schema", {})}}}
    return {"response_format": {"type": "json_object"}}


def _chat_body(params: GenerateParams, model: str) -> dict[str, Any]:
    body = _sampling(params, model)
    if params.tools and params.tool_messages is not None:
        # The upstream calls tools natively; the API server's grammar for them is not needed.
        body |= {"messages": params.tool_messages, "tools": params.tools}
        if params.tool_choice is not None:
            body["tool_choice"] = params.tool_choice
    else:
        body["messages"] = params.messages
        if params.response_format:
            body |= _constraint_fields(params.response_format)
    if params.logprobs is not None:
        body |= {"logprobs": True, "top_logprobs": params.logprobs}
    return body | _templating(params)


def _templating(params: GenerateParams) -> dict[str, Any]:
    """The chat templating fields a request set (vLLM's; OpenAI's `reasoning_effort`): only
    those, since a strict upstream may refuse fields it does not know."""
    fields: dict[str, Any] = {
        "chat_template_kwargs": params.chat_template_kwargs,
        "reasoning_effort": params.reasoning_effort,
        "add_generation_prompt": False if not params.add_generation_prompt else None,
        "continue_final_message": True if params.continue_final_message else None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _completion_body(params: GenerateParams, model: str) -> dict[str, Any]:
    body = _sampling(params, model)
    body["prompt"] = params.prompt_token_ids if params.prompt_token_ids is not None else (params.prompt or "")
    if params.echo:
        body["echo"] = True
    if params.suffix is not None:
        body["suffix"] = params.suffix
    if params.logprobs is not None:
        body["logprobs"] = params.logprobs
    if params.response_format:
        body |= _constraint_fields(params.response_format)
    return body


def request(params: GenerateParams, model: str) -> tuple[str, dict[str, Any]]:
    """The upstream path and JSON body for a generation."""
    if params.messages is not None:
        return "/chat/completions", _chat_body(params, model)
    return "/completions", _completion_body(params, model)


REDACTED = "[redacted]"

# A key as servers echo it masked: `sk-proj-****abcd`, `sk-abc...wxyz`.
_MASKED_KEY = re.compile(r"[\w-]*\*{3,}[\w-]*|\bsk-[\w-]*\.{2,}[\w-]+")


def without_credentials(url: str) -> str:
    """`url` without any `user:password@`, as logs and worker details name the upstream."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Secrets:
    """What of the operator's must never reach a client: the upstream's address (with any
    credentials in it) and its API key, whole or masked."""

    words: tuple[str, ...] = ()

    @classmethod
    def of(cls, url: str, api_key: str | None) -> Secrets:
        """The secrets of an upstream at `url` called with `api_key`."""
        parts = urlsplit(url)
        words = {url, url.rstrip("/"), without_credentials(url), parts.netloc, parts.hostname or "", parts.password or "", api_key or ""}
        if parts.username:
            words.add(f"{parts.username}:")
        # Longest first, so a URL goes whole rather than leaving pieces around its host.
        return cls(tuple(sorted((w for w in words if len(w) >= 3), key=len, reverse=True)))

    def scrub(self, text: str) -> str:
        """`text` with every secret, and anything that looks like a masked key, redacted."""
        for word in self.words:
            text = text.replace(word, REDACTED)
        return _MASKED_KEY.sub(REDACTED, text)


def error_from(status: int, content: bytes, secrets: Secrets) -> ChatgateError:
    """The chatgate error for an upstream's error response."""
    try:
        error = json.loads(content).get("error")
    except (ValueError, AttributeError):
        error = None
    return _error_of(status, error, secrets)


def _error_of(status: int, error: Any, secrets: Secrets) -> ChatgateError:
    """The chatgate error for HTTP `status` and an OpenAI-shaped `error` object (or text)."""
    message, param, code = f"The upstream server answered HTTP {status}.", None, None
    if isinstance(error, dict):
        message = str(error.get("message") or message)
        param, code = error.get("param"), error.get("code")
    elif isinstance(error, str):  # some servers send {"error": "text"}
        message = error
    if status in (401, 403) or status >= 500:
        # Not the client's doing, and its text may name the operator's key or hosts.
        log.warning("the upstream answered HTTP %d: %s", status, secrets.scrub(message))
        if status >= 500:
            return WorkerUnavailableError(f"The model's upstream server failed (HTTP {status}).")
        return WorkerError("The model's upstream server refused this server's credentials.", code="upstream_auth_failed")
    message = secrets.scrub(message)
    if code == "context_length_exceeded":
        return ContextLengthExceededError(message, param=param)
    cls = _BY_STATUS.get(status, InvalidRequestError)
    return cls(message, param=param if isinstance(param, str) else None)


def stream_error(error: Any, secrets: Secrets = Secrets()) -> ChatgateError:
    """The chatgate error for an error event inside a 200 stream. vLLM refuses some requests
    only once streaming (an out-of-vocabulary `logit_bias` id) and puts the HTTP status it
    means in `code`: a 4xx there is the client's error, passed on as such."""
    if isinstance(error, dict) and isinstance(error.get("code"), int) and 400 <= error["code"] < 500:
        return _error_of(error["code"], error, secrets)
    message = error.get("message") if isinstance(error, dict) else str(error)
    log.warning("the upstream failed mid-stream: %s", secrets.scrub(str(message)))
    return WorkerError("The model's upstream server failed mid-stream.")


def _alternatives(top: Any) -> list[TokenAlternative]:
    """Top alternatives, in either the chat form (a list) or the completions form (a dict)."""
    if isinstance(top, dict):
        pairs = list(top.items())
    else:
        pairs = [(t.get("token", ""), t.get("logprob", 0.0)) for t in top or []]
    return [TokenAlternative(token_id=-1, token=tok, logprob=float(lp)) for tok, lp in pairs]


def _chat_logprobs(logprobs: Any) -> list[WorkerLogprob] | None:
    if not isinstance(logprobs, dict) or logprobs.get("content") is None:
        return None
    return [
        WorkerLogprob(
            token_id=-1, token=item["token"], logprob=float(item["logprob"]), top=_alternatives(item.get("top_logprobs"))
        )
        for item in logprobs["content"]
    ]


# One scored token of a completions-style `logprobs` object: its text, logprob and top alternatives.
_Entry = tuple[str, Any, Any]


def _completion_entries(logprobs: Any) -> list[_Entry] | None:
    """The (token, logprob, top alternatives) of a completions-style `logprobs` object."""
    if not isinstance(logprobs, dict) or not logprobs.get("tokens"):
        return None
    tokens = logprobs["tokens"]
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return list(zip(tokens, logprobs.get("token_logprobs") or [], tops, strict=False))


def _worker_logprobs(entries: list[_Entry] | None) -> list[WorkerLogprob] | None:
    if not entries:
        return None
    return [
        WorkerLogprob(token_id=-1, token=token, logprob=float(lp or 0.0), top=_alternatives(top))
        for token, lp, top in entries
    ]


def echoed_prompt(params: GenerateParams) -> str | list[int] | None:
    """The prompt an upstream will echo with log-probabilities, if it will."""
    if not params.echo or params.logprobs is None or params.messages is not None:
        return None
    return params.prompt_token_ids if params.prompt_token_ids is not None else (params.prompt or "")


def _prompt_count(logprobs: dict[str, Any], prompt: str | list[int]) -> int:
    """How many leading entries of an echoing event score the prompt: one per prompt token id,
    or, for a text prompt, those whose text offset falls inside it."""
    if isinstance(prompt, list):
        return len(prompt)
    return sum(1 for offset in logprobs.get("text_offset") or [] if offset < len(prompt))


def split_echo(logprobs: Any, prompt: str | list[int]) -> tuple[list[PromptLogprob] | None, list[WorkerLogprob] | None]:
    """The prompt's log-probabilities (the first has none) and the generated tokens' of an
    echoing event."""
    entries = _completion_entries(logprobs)
    if entries is None:
        return None, None
    count = _prompt_count(logprobs, prompt)
    scored = [
        PromptLogprob(token_id=-1, token=token, logprob=None if lp is None else float(lp),
                      top=_alternatives(top) if lp is not None else [])
        for token, lp, top in entries[:count]
    ]
    return scored, _worker_logprobs(entries[count:])


def upstream_usage(usage: dict[str, Any]) -> WorkerUsage:
    """The worker protocol's usage from an upstream's OpenAI `usage`, with the prompt tokens it
    served from its prefix cache (`prompt_tokens_details.cached_tokens`) and its reasoning
    tokens (`completion_tokens_details.reasoning_tokens`) where it says."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    spent = usage.get("completion_tokens_details")
    reasoning = spent.get("reasoning_tokens") if isinstance(spent, dict) else None
    fields = {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage}
    return WorkerUsage.model_validate(fields | {
        "cached_tokens": cached if type(cached) is int and cached >= 0 else 0,
        "reasoning_tokens": reasoning if type(reasoning) is int and reasoning >= 0 else None,
    })


@dataclass
class StreamReader:
    """Turns one upstream stream's events into delta chunks.

    The finish reason is held back until the usage event (which comes after it), so the last
    chunk carries both, as an engine's last output does. Upstreams report usage only at the end
    (or not at all), so until then every chunk carries a running count, as an engine's outputs
    do: the prompt as counted here, and one generated token per scored token or per event
    that generated something (servers stream one token per event).
    """

    chat: bool
    echoed: str | list[int] | None = None  # the prompt the first event echoes, with logprobs
    secrets: Secrets = Secrets()
    prompt_tokens: int = 0
    generated: int = 0
    finish: str | None = None
    usage: WorkerUsage | None = None
    calls: dict[int, dict[str, str]] = field(default_factory=dict)

    def event(self, data: dict[str, Any]) -> WorkerChunk | None:
        """The chunk to pass on for one event, if it carries text or log-probabilities."""
        if "error" in data:
            raise stream_error(data["error"], self.secrets)
        if data.get("usage"):
            self.usage = upstream_usage(data["usage"])
        choices = data.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        self.finish = choice.get("finish_reason") or self.finish
        prompt, reasoning = None, ""
        if self.chat:
            delta = choice.get("delta") or {}
            calls = delta.get("tool_calls") or []
            self._collect_calls(calls)
            text, logprobs = delta.get("content") or "", _chat_logprobs(choice.get("logprobs"))
            # vLLM's field, under its older name and its newer one.
            reasoning = str(delta.get("reasoning_content") or delta.get("reasoning") or "")
            self.generated += len(logprobs) if logprobs else int(bool(text or calls or reasoning))
        else:
            text, logprobs, prompt = self._completion(choice)
            self.generated += len(logprobs) if logprobs else int(bool(text) and not prompt)
        if not text and not logprobs and not prompt and not reasoning:
            return None
        return WorkerChunk(
            text=text, reasoning_content=reasoning, token_logprobs=logprobs, prompt_logprobs=prompt, usage=self.running()
        )

    def running(self) -> WorkerUsage:
        """The usage so far: the upstream's own once it has sent it, else counted here."""
        if self.usage is not None:
            return self.usage
        total = self.prompt_tokens + self.generated
        return WorkerUsage(prompt_tokens=self.prompt_tokens, completion_tokens=self.generated, total_tokens=total)

    def _completion(self, choice: dict[str, Any]) -> tuple[str, list[WorkerLogprob] | None, list[PromptLogprob] | None]:
        """Text, generated tokens' and (on the echoing event) prompt tokens' log-probabilities."""
        logprobs = choice.get("logprobs")
        if self.echoed is not None and logprobs:
            prompt, generated = split_echo(logprobs, self.echoed)
            self.echoed = None
            return choice.get("text") or "", generated, prompt
        return choice.get("text") or "", _worker_logprobs(_completion_entries(logprobs)), None

    def _collect_calls(self, deltas: list[dict[str, Any]]) -> None:
        for delta in deltas:
            call = self.calls.setdefault(int(delta.get("index", 0)), {"name": "", "arguments": ""})
            function = delta.get("function") or {}
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""

    def last(self) -> WorkerChunk:
        """The closing chunk: tool calls as the tool plan's JSON text, finish reason and usage."""
        # "tool_calls" and "function_call" become "stop": the API server parses calls out of a
        # reply that stopped normally.
        text, finish = "", finish_reason_of(self.finish or "stop")
        if self.calls:
            calls = [{"name": c["name"], "arguments": _arguments(c["arguments"])} for _, c in sorted(self.calls.items())]
            text, finish = json.dumps({"tool_calls": calls}), "stop"
        return WorkerChunk(text=text, finish_reason=finish, usage=self.running())


def _arguments(text: str) -> dict[str, Any] | str:
    """An upstream call's arguments: the object they spell, else their text exactly as sent."""
    try:
        parsed = json.loads(text or "{}")
    except ValueError:
        return text
    return parsed if isinstance(parsed, dict) else text
