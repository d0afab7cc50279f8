"""The default model's own Hugging Face tokenizer, for tests that need it outside a fixture."""

from __future__ import annotations

from pathlib import Path


def real_tokenizer() -> object:
    """The default model's own Hugging Face tokenizer, loaded from the converted checkpoint."""
    from transformers import AutoTokenizer

    from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
    from chatgate.settings import EngineSettings

    settings = EngineSettings()
    path: Path = cached_checkpoint(resolve_chat_model(settings.model_path), settings.cache_dir)
    return AutoTokenizer.from_pretrained(path)
