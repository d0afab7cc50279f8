"""vLLM's public extras beside OpenAI's API: `/tokenize` and `/detokenize`, in vLLM's shapes."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, Field, field_validator, model_validator

from chatgate.protocol import limits
from chatgate.protocol.limits import PublicRequest
from chatgate.protocol.openai import ChatMessage
from chatgate.protocol.templating import TemplateVariables, continues_an_assistant_message

_Request = PublicRequest  # strict, unknown fields ignored, every value JSON- and UTF-8-safe


class TokenizeRequest(_Request):
    """Body of `POST /tokenize`: `{model, prompt}` or `{model, messages, add_generation_prompt}`."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: TemplateVariables | None = None
    # None: as generation does, special tokens for a prompt and none around a templated chat.
    add_special_tokens: bool | None = None
    return_token_strs: bool = False

    _continues = field_validator("continue_final_message")(continues_an_assistant_message)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self

    def cost(self) -> limits.Cost:
        """Chat's cap on messages."""
        return limits.Cost(messages=len(self.messages or []))

    def special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens (BOS, ...)."""
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.messages is None


class TokenizeResponse(BaseModel):
    """Response of `/tokenize`."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    """Body of `POST /detokenize`."""

    model: str = Field(min_length=1)
    tokens: list[Annotated[int, Field(ge=0)]]

    max_json_values: ClassVar[int] = 1_100_000  # a long context's token ids


class DetokenizeResponse(BaseModel):
    """Response of `/detokenize`."""

    prompt: str
