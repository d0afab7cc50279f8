"""The `cross-encoder` engine: a sequence-classification model that reads two texts together and
scores how well they match (what `/v1/rerank` and `/v1/score` want, more exactly than comparing
two embeddings).

A Hugging Face folder whose config names a `...ForSequenceClassification` architecture is served
by it (also when given as `--embedding-model-path`). A pair is tokenized as the model was trained
(`[CLS] first [SEP] second [SEP]` for BERT-like models); its score is the sigmoid of the single
logit, or the last class's probability for a model of several labels, as sentence-transformers'
`CrossEncoder` reports them. One thread owns the model; pairs run in padded batches.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import torch

from chatgate.engines.base import ChatOptions, GenerationOutput, ModelInfo, SamplingParams
from chatgate.engines.loading import model_construction
from chatgate.engines.one_thread import OneThreadEngine
from chatgate.errors import InvalidRequestError
from chatgate.settings import EngineSettings

BATCH = 32


def is_cross_encoder(folder: str | Path) -> bool:
    """Whether `folder` holds a sequence-classification model (by its config's architectures)."""
    config = Path(folder).expanduser() / "config.json"
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


class CrossEncoderEngine(OneThreadEngine):
    """Serves a cross-encoder: scores of text pairs, nothing generated or embedded."""

    thread_name = "chatgate-cross-encoder"

    def __init__(self, settings: EngineSettings) -> None:
        self._settings = settings
        self._path = Path(settings.model_path).expanduser()
        if not is_cross_encoder(self._path):
            raise FileNotFoundError(
                f"{settings.model_path!r} is not a folder with a sequence-classification model (config.json architectures)"
            )
        self._model: Any = None
        self._tokenizer: Any = None
        name = settings.model_names[0] if settings.model_names else self._path.name
        self.info = ModelInfo(name=name, context_length=0, vocab_size=0, generates=False, cross_encoder=True)

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if self._settings.num_threads:
            torch.set_num_threads(self._settings.num_threads)
        with model_construction():
            self._model = AutoModelForSequenceClassification.from_pretrained(str(self._path))
        self._model = self._model.to(self._settings.device).eval()
        self._tokenizer = AutoTokenizer.from_pretrained(str(self._path))
        positions = int(getattr(self._model.config, "max_position_embeddings", 512) or 512)
        limit = int(self._tokenizer.model_max_length) if self._tokenizer.model_max_length < 1_000_000 else positions
        self.info = ModelInfo(
            name=self.info.name, context_length=min(positions, limit), vocab_size=int(self._tokenizer.vocab_size),
            generates=False, cross_encoder=True,
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def pair_tokens(self, first: str, second: str) -> int:
        """Tokens the model reads for the pair (special tokens included)."""
        return len(self._tokenizer(first, second)["input_ids"])

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
        add_generation_prompt: bool = True, options: ChatOptions | None = None,
    ) -> str:
        raise self._only_scores()

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationOutput]:
        raise self._only_scores()
        yield  # pragma: no cover

    def _only_scores(self) -> InvalidRequestError:
        return InvalidRequestError(
            f"The model `{self.info.name}` is a cross-encoder; use /v1/rerank or /v1/score.", param="model"
        )

    async def score_pairs(self, pairs: list[tuple[str, str]]) -> list[float]:
        # A batch at a time, so a request cancelled (its client gone, its deadline past) stops
        # after the batch running, and other requests' batches take turns with it.
        out: list[float] = []
        for start in range(0, len(pairs), BATCH):
            out += await self._run(self._score, pairs[start : start + BATCH])
        return out

    @torch.inference_mode()
    def _score(self, batch: list[tuple[str, str]]) -> list[float]:
        encoded = self._tokenizer([a for a, _ in batch], [b for _, b in batch], padding=True, return_tensors="pt")
        logits = self._model(**{k: v.to(self._settings.device) for k, v in encoded.items()}).logits.float()
        scores = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=-1)[:, -1]
        return [float(s) for s in scores.cpu()]
