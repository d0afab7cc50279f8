"""The embeddings API's wire format, as OpenAI's spec names it: `POST /v1/embeddings` (and
`/v1/engines/{model}/embeddings`)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, Field

from chatgate.protocol.limits import PublicRequest
from chatgate.protocol.openai import TokenIds


def _no_empty_input(value: str) -> str:
    if not value:
        raise ValueError("input must not be an empty string")
    return value


InputText = Annotated[str, AfterValidator(_no_empty_input)]
MAX_EMBEDDING_INPUTS = 2048


class EmbeddingRequest(PublicRequest):
    """`POST /v1/embeddings` (and `/v1/engines/{model}/embeddings`)."""

    model: str = Field("", description="Required, unless the URL names the model.")
    input: (
        InputText
        | Annotated[list[InputText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    # Up to 2,048 token-id lists.
    max_json_values: ClassVar[int] = 1_100_000


class Embedding(BaseModel):
    """One vector of an embeddings response: floats, or base64 of little-endian float32."""

    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(BaseModel):
    """Token accounting of an embeddings response."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """`POST /v1/embeddings`."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
