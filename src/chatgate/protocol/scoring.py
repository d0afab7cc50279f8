"""The public wire formats of reranking and scoring: `POST /v1/rerank` (Cohere's and Jina's shape,
as vLLM serves it at `/rerank`, `/v1/rerank` and `/v2/rerank`) and vLLM's `POST /v1/score`.

Every text is an embedding input: non-empty, and at most as many as `/v1/embeddings` takes in
one request (`MAX_EMBEDDING_INPUTS`), so the embedding caps apply.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, ValidationInfo, field_validator

from chatgate.protocol.limits import PublicRequest
from chatgate.protocol.embeddings import MAX_EMBEDDING_INPUTS, InputText
from chatgate.protocol.openai import now

Texts = Annotated[list[InputText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]


class RerankDocument(PublicRequest):
    """A document given as an object (Cohere's and Jina's `{"text": ...}` form)."""

    text: InputText


def _document_kind(value: Any) -> str:
    # Tags that are not identifiers, so error locations (`documents[0].text`) leave them out.
    return "object document" if isinstance(value, dict | RerankDocument) else "text document"


Document = Annotated[
    Annotated[InputText, Tag("text document")] | Annotated[RerankDocument, Tag("object document")],
    Discriminator(_document_kind),
]


class RerankRequest(PublicRequest):
    """`POST /v1/rerank`: order `documents` by relevance to `query`."""

    model: str = Field(min_length=1)
    query: InputText
    documents: Annotated[list[Document], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    # vLLM's default: 0 (or none) returns every document.
    top_n: int | None = Field(None, ge=0)
    return_documents: bool = True
    user: str | None = None

    def texts(self) -> list[str]:
        """The documents' texts, in the order given."""
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ScoreRequest(PublicRequest):
    """`POST /v1/score` (vLLM's): `text_1` against `text_2`, one to one (equal lengths) or one
    to many (`text_1` a single text)."""

    model: str = Field(min_length=1)
    text_1: InputText | Texts
    text_2: InputText | Texts
    user: str | None = None

    @field_validator("text_2")
    @classmethod
    def _pairs(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        first = info.data.get("text_1")
        firsts = 1 if first is None or isinstance(first, str) else len(first)
        seconds = 1 if isinstance(value, str) else len(value)
        if firsts != 1 and firsts != seconds:
            raise ValueError(f"text_1 has {firsts} texts and text_2 {seconds}: give one text_1, or as many as text_2")
        return value

    def lists(self) -> tuple[list[str], list[str]]:
        """Both sides as lists."""
        first = [self.text_1] if isinstance(self.text_1, str) else self.text_1
        second = [self.text_2] if isinstance(self.text_2, str) else self.text_2
        return first, second


class DocumentText(BaseModel):
    """`document` of a rerank result."""

    text: str


class RerankResult(BaseModel):
    """One document's place: its index in the request, its score, and (when asked) its text."""

    index: int
    relevance_score: float
    document: DocumentText | None = None


class RerankUsage(BaseModel):
    """Tokens read (the query once, every document)."""

    total_tokens: int


class RerankResponse(BaseModel):
    """Results sorted by score, highest first (ties in request order)."""

    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage


class ScoreData(BaseModel):
    """One pair's score."""

    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    """Tokens read."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreResponse(BaseModel):
    """Scores in the order of the pairs."""

    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[ScoreData]
    usage: ScoreUsage
