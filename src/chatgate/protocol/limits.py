"""Caps on what one request may ask for, and the checks every public request value passes.

Every cap here is enforced in the request schema, so a request over it gets a 400 naming the
field before any work is done. OpenAI's limits are used where OpenAI publishes one; the others
are sized so that no legitimate request comes near them while one request can no longer cost
the server seconds of CPU or hundreds of megabytes.

Every value is also checked to be representable on the wire as JSON and UTF-8: no NaN or
Infinity (JSON has none, and the API server forwards requests to workers as JSON) and no lone
UTF-16 surrogates (which UTF-8 cannot encode).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator

MAX_MESSAGES = 2048  # OpenAI's cap on `messages`
MAX_STOP_SEQUENCES = 4  # OpenAI's cap on `stop`
MAX_STOP_CHARS = 256
MAX_CACHE_SALT_CHARS = 256  # `cache_salt` (vLLM's field): room for a random token, not a document
MAX_LOGIT_BIAS = 300  # OpenAI's cap on `logit_bias` entries
MAX_TOKEN_ID = 2**31 - 1  # token ids are 32-bit in every tokenizer we know
MAX_TOOLS = 128  # OpenAI's cap on `tools`
MAX_SCHEMA_DEPTH = 64  # JSON nesting of one tool's parameters or one response schema
MAX_SCHEMA_VALUES = 20_000  # JSON values (objects, arrays, scalars) in one such schema
# All the schemas of one request together (tools, functions, response format): checking a
# schema is pure Python, ~50 µs a value, so this bounds one request's checks to about a second.
MAX_REQUEST_SCHEMA_VALUES = 20_000
MAX_COMPLETION_CHOICES = 128  # completions: prompts × n
MAX_TOKEN_CHECK_PROMPTS = 128
# Non-streamed log-probabilities are held in memory until the response is complete: at most this
# many token entries (each ~60 bytes of JSON) in one response. Streams are not held, so not capped.
MAX_LOGPROB_ENTRIES = 500_000
# When a request leaves the completion budget open, the budget assumed for the cap above.
ASSUMED_COMPLETION_TOKENS = 4096
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # signed 64-bit, as OpenAI and torch take seeds
# Any integer in a request body: beyond every field's own bound (so the field's check names it),
# far below what costs anything to print.
INT_MIN, INT_MAX = -(10**100), 10**100


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone UTF-16 surrogate)") from None


def check_json(value: Any, *, max_depth: int | None = None, max_values: int | None = None) -> None:
    """Raise `ValueError` if `value` cannot travel as JSON, or is deeper or larger than allowed.

    The walk is iterative, so a deeply nested value cannot exhaust the interpreter's stack.
    Validated sub-models are skipped: they checked their own fields.
    """
    pending: list[tuple[Any, int]] = [(value, 1)]
    seen = 0
    while pending:
        item, depth = pending.pop()
        seen += 1
        if max_values is not None and seen > max_values:
            raise ValueError(f"it has more than {max_values} values")
        if max_depth is not None and depth > max_depth:
            raise ValueError(f"it is nested more than {max_depth} levels deep")
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite (NaN and Infinity are not JSON)")
        elif isinstance(item, dict):
            for key in item:
                _check_text(str(key))
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend((child, depth + 1) for child in item)


def count_values(value: Any) -> int:
    """How many JSON values (objects, arrays, scalars) `value` holds, itself included."""
    pending, seen = [value], 0
    while pending:
        item = pending.pop()
        seen += 1
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return seen


def check_volume(value: Any, *, max_values: int, max_depth: int) -> None:
    """Raise `ValueError` if `value` holds more JSON values, or nests deeper, than allowed: the
    bound on all later work on a request body (its validation walks it again)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    seen = 0
    while pending:
        item, depth = pending.pop()
        seen += 1
        if seen > max_values:
            raise ValueError(f"it holds more than {max_values} JSON values")
        if depth > max_depth:
            raise ValueError(f"it is nested more than {max_depth} levels deep")
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)
        elif isinstance(item, int) and not INT_MIN <= item <= INT_MAX:
            # No field takes more; a 4,000-digit number would only cost every message it is in.
            raise ValueError("integers must have at most 100 digits")


def bounded_schema(value: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema of bounded depth and size (checked before anything recurses into it)."""
    check_json(value, max_depth=MAX_SCHEMA_DEPTH, max_values=MAX_SCHEMA_VALUES)
    return value


@dataclass(frozen=True)
class Cost:
    """What serving a request would take, measured from the request alone, before any work:
    checked against one set of caps (`check`) by the door every public route passes.

    Each count names the request field to blame when it is over its cap."""

    choices: int = 1  # generations started at once (n, or prompts × n)
    choices_param: str = "n"
    logprob_entries: int = 0  # log-probability entries a response that is not streamed holds
    logprob_param: str = "logprobs"
    logprob_detail: str = ""  # how the entries were counted, for the error message
    schema_values: int = 0  # JSON values in all the request's schemas together
    schema_param: str = "tools"
    messages: int = 0  # messages the model is shown
    messages_param: str = "messages"
    tools: int = 0
    tools_param: str = "tools"
    calls: int = 0  # most tool calls in one assistant turn
    calls_param: str = "messages"

    def check(self) -> None:
        """Raise `CostError` naming the first field whose count is over its cap."""
        if self.messages > MAX_MESSAGES:
            raise CostError(self.messages_param, f"{self.messages} messages, more than the {MAX_MESSAGES} allowed")
        if self.tools > MAX_TOOLS:
            raise CostError(self.tools_param, f"{self.tools} tools, more than the {MAX_TOOLS} allowed")
        if self.calls > MAX_TOOLS:
            raise CostError(self.calls_param, f"{self.calls} tool calls in one turn, more than the {MAX_TOOLS} allowed")
        if self.schema_values > MAX_REQUEST_SCHEMA_VALUES:
            raise CostError(
                self.schema_param,
                f"its schemas hold {self.schema_values} JSON values together, more than the "
                f"{MAX_REQUEST_SCHEMA_VALUES} allowed in one request",
            )
        if self.choices > MAX_COMPLETION_CHOICES:
            raise CostError(
                self.choices_param, f"{self.choices} choices, more than the {MAX_COMPLETION_CHOICES} allowed"
            )
        if self.logprob_entries > MAX_LOGPROB_ENTRIES:
            raise CostError(
                self.logprob_param,
                f"{self.logprob_detail or self.logprob_entries} would be {self.logprob_entries} "
                f"log-probability entries, over the limit of {MAX_LOGPROB_ENTRIES} for a response that "
                "is not streamed; lower n, the log-probability count or the token budget, or stream",
            )


class CostError(ValueError):
    """A request over one of the caps of `Cost.check`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def logprob_entries(*, choices: int, alternatives: int, tokens: int | None, scored: int = 0) -> tuple[int, str]:
    """Log-probability entries a response that is not streamed would hold, and how they were
    counted: every choice's generated tokens (`ASSUMED_COMPLETION_TOKENS` when the budget is
    open), plus `scored` prompt tokens per choice (`echo` scores the prompt once per choice)."""
    budget = tokens or ASSUMED_COMPLETION_TOKENS
    per_token = alternatives + 1
    entries = choices * per_token * (budget + scored)
    prompt = f" + {scored} prompt tokens scored" if scored else ""
    return entries, f"{choices} choices × {per_token} log-probabilities per token × ({budget} tokens{prompt})"


class PublicRequest(BaseModel):
    """Base of every public request body: strict types, unknown fields ignored, every value
    representable as JSON and UTF-8, and a `cost` and `schemas` the door checks before any work.

    The door (`chatgate.api.door`) refuses to serve a route whose body is not one of these."""

    # Strict: a number sent as a string, or 1 for true, is refused as OpenAI refuses it.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    # The door's walk of the raw JSON body, before validation: most values and deepest nesting.
    # Bodies of token-id lists (completions, embeddings) raise the first.
    max_json_values: ClassVar[int] = 100_000
    # Fields nest to at most MAX_SCHEMA_DEPTH (schemas) and name the field when deeper; this
    # only stops absurd bodies before validation recurses into them.
    max_json_depth: ClassVar[int] = 900  # `json` itself stops near 1,000

    @field_validator("*", mode="after")
    @classmethod
    def _wire_safe(cls, value: Any) -> Any:
        check_json(value)
        return value

    def cost(self) -> Cost:
        """What serving this request would take (nothing beyond one choice, by default)."""
        return Cost()

    def scheduling_priority(self) -> int | None:
        """The `priority` asked for (lower runs first); None if none was (or the API has no such field)."""
        return None

    def schemas(self) -> Iterable[tuple[str, dict[str, Any]]]:
        """Every JSON schema the request carries, with the field that holds it."""
        return ()

    def grammars(self) -> Iterable[tuple[str, dict[str, Any]]]:
        """Every regex, choice or grammar constraint the request carries (in the worker
        protocol's form), with the field that holds it: the door compiles each."""
        return ()


def schemas_cost(schemas: Iterable[tuple[str, dict[str, Any]]]) -> tuple[int, str]:
    """JSON values in all the schemas together, and the field of the first."""
    total, first = 0, "tools"
    for index, (param, schema) in enumerate(schemas):
        total += count_values(schema)
        first = param if index == 0 else first
    return total, first
