"""FastChat's own public API beside OpenAI's: `/api/v1/token_check`, in FastChat's shapes."""

from __future__ import annotations

from pydantic import BaseModel, Field

from chatgate.protocol.limits import MAX_TOKEN_CHECK_PROMPTS, PublicRequest


class TokenCheckItem(PublicRequest):
    """One prompt to check."""

    model: str = Field(min_length=1)
    prompt: str
    max_tokens: int = Field(ge=0)


class TokenCheckRequest(PublicRequest):
    """Body of `POST /api/v1/token_check`."""

    prompts: list[TokenCheckItem] = Field(min_length=1, max_length=MAX_TOKEN_CHECK_PROMPTS)


class TokenCheckResult(BaseModel):
    """Whether one prompt plus its completion fits the model's context."""

    fits: bool
    tokenCount: int  # noqa: N815 - FastChat's field name
    contextLength: int  # noqa: N815 - FastChat's field name


class TokenCheckResponse(BaseModel):
    """Response of `POST /api/v1/token_check`."""

    prompts: list[TokenCheckResult]
