"""OpenAI request fields this server takes but cannot act on, declared so that none is silently
ignored: each is accepted and ignored where OpenAI documents it as a hint or a label (the answer
is the same without it), accepted at the value that asks for nothing we lack, and otherwise a 400
naming it. The README's table lists them all.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from chatgate.protocol.limits import PublicRequest


def only(field: str, allowed: tuple[Any, ...], why: str) -> Any:
    """A check that refuses any value of `field` but None and `allowed`, saying `why`."""

    def check(value: Any) -> Any:
        if value is not None and value not in allowed:
            shown = " or ".join(repr(a) for a in allowed) or "null"
            raise ValueError(f"{field} {value!r} is not supported: {why} (give {shown} or leave it out)")
        return value

    return AfterValidator(check)


# OpenAI's caps on `metadata`: 16 pairs, keys of 64 characters, values of 512.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]
ShortLabel = Annotated[str, Field(max_length=64)]
ServiceTier = Annotated[
    Literal["auto", "default", "flex", "scale", "priority"],
    only("service_tier", ("auto", "default"), "this server has one tier"),
]
CacheRetention = Annotated[
    Literal["in-memory", "in_memory", "24h"],
    only("prompt_cache_retention", ("in-memory", "in_memory"), "cached prefixes live only in memory here"),
]
Verbosity = Annotated[
    Literal["low", "medium", "high"],
    only("verbosity", ("medium",), "the model's length is not steered here"),
]


class PromptLabels(PublicRequest):
    """Labels OpenAI lets every generation request carry; none changes the answer."""

    # Stored with the completion by OpenAI; nothing is stored here, so they go nowhere.
    metadata: Metadata | None = None
    # Identify the end user to OpenAI's abuse monitoring; this server has none.
    safety_identifier: ShortLabel | None = None
    # A hint to OpenAI's cache routing: prefixes are cached here without it (`cache_salt` isolates).
    prompt_cache_key: Annotated[str, Field(max_length=1024)] | None = None
    prompt_cache_retention: CacheRetention | None = None
    service_tier: ServiceTier | None = None


def _text_only(value: list[str]) -> list[str]:
    if "audio" in value:
        raise ValueError("modalities 'audio' is not supported: this server generates text only")
    return value


class PredictionContent(PublicRequest):
    """`prediction`: text the reply is expected to resemble."""

    type: Literal["content"]
    content: str | list[dict[str, Any]]


class ChatExtras(PromptLabels):
    """Chat fields beyond the ones served: hints (accepted), and outputs this server lacks (400)."""

    # Predicted outputs only make OpenAI faster; the reply is the same without them.
    prediction: PredictionContent | None = None
    # Chat completions are not kept (Responses are): `store` true asks for what is not done here.
    store: Annotated[bool, only("store", (False,), "this server keeps no chat completions")] | None = None
    modalities: Annotated[list[Literal["text", "audio"]], AfterValidator(_text_only)] | None = None
    audio: Annotated[dict[str, Any], only("audio", (), "this server generates text only")] | None = None
    web_search_options: Annotated[dict[str, Any], only("web_search_options", (), "this server cannot search the web")] | None = None
    verbosity: Verbosity | None = None


class CompletionExtras(PromptLabels):
    """Legacy completions fields beyond the ones served."""

    # Server-side best-of-n: only the trivial case (as many candidates as choices) is served.
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionExtras:
        n = getattr(self, "n", 1)
        if self.best_of is not None and self.best_of != n:
            problem = "must be at least n" if self.best_of < n else "is not supported: give best_of equal to n, or leave it out"
            message = f"best_of={self.best_of} with n={n} {problem}"
            detail = InitErrorDetails(type=PydanticCustomError("value_error", message), loc=("best_of",), input=self.best_of)
            raise ValidationError.from_exception_data(type(self).__name__, [detail])
        return self


class ResponsesStreamOptions(PublicRequest):
    """The Responses API's `stream_options`."""

    # OpenAI pads stream events against length side channels; accepted, and nothing is padded here.
    include_obfuscation: bool | None = None


class ResponsesExtras(PromptLabels):
    """Responses fields beyond the ones served."""

    # OpenAI's `"auto"` drops the middle of a conversation that does not fit; here it is refused
    # (`"disabled"`, OpenAI's default, is what happens).
    truncation: Annotated[
        Literal["auto", "disabled"], only("truncation", ("disabled",), "a conversation that does not fit is refused, not cut")
    ] | None = None
    # Caps calls to OpenAI's built-in tools, of which this server has none: always met.
    max_tool_calls: int | None = Field(None, ge=1)
    prompt: Annotated[dict[str, Any], only("prompt", (), "this server keeps no prompt templates")] | None = None
    conversation: Annotated[str | dict[str, Any], only("conversation", (), "this server is stateless")] | None = None
    stream_options: ResponsesStreamOptions | None = None
