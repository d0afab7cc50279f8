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
from typing import Any

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
MAX_COMPLETION_CHOICES = 128  # completions: prompts × n
MAX_TOKEN_CHECK_PROMPTS = 128
# Non-streamed log-probabilities are held in memory until the response is complete: at most this
# many token entries (each ~60 bytes of JSON) in one response. Streams are not held, so not capped.
MAX_LOGPROB_ENTRIES = 500_000
# When a request leaves the completion budget open, the budget assumed for the cap above.
ASSUMED_COMPLETION_TOKENS = 4096
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # signed 64-bit, as OpenAI and torch take seeds


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


def bounded_schema(value: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema of bounded depth and size (checked before anything recurses into it)."""
    check_json(value, max_depth=MAX_SCHEMA_DEPTH, max_values=MAX_SCHEMA_VALUES)
    return value


class PublicRequest(BaseModel):
    """Base of every public request body: strict types, unknown fields ignored, and every
    value representable as JSON and UTF-8."""

    # Strict: a number sent as a string, or 1 for true, is refused as OpenAI refuses it.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _wire_safe(cls, value: Any) -> Any:
        check_json(value)
        return value


def check_logprob_volume(*, choices: int, alternatives: int, budget: int | None) -> None:
    """Refuse a non-streamed response that would hold more log-probability entries than allowed."""
    tokens = budget or ASSUMED_COMPLETION_TOKENS
    entries = choices * (alternatives + 1) * tokens
    if entries > MAX_LOGPROB_ENTRIES:
        raise ValueError(
            f"n={choices} choices × {alternatives + 1} log-probabilities per token × {tokens} tokens "
            f"would be {entries} entries, over the limit of {MAX_LOGPROB_ENTRIES} for a response "
            "that is not streamed; lower n, the log-probability count or the token budget, or stream"
        )
