"""Engines by name: the one registry workers use to build the engine they serve."""

from __future__ import annotations

import logging
from collections.abc import Callable

from chatgate.engines.base import Engine
from chatgate.settings import EngineSettings
from chatgate.errors import StartupError

log = logging.getLogger(__name__)


def _auto(settings: EngineSettings) -> Engine:
    """llama.cpp for a GGUF file where llama-cpp-python is installed, else transformers."""
    import importlib.util

    from chatgate.engines.loading import resolve_chat_model

    if resolve_chat_model(settings.model_path).gguf_file is None:
        return _transformers(settings)
    if importlib.util.find_spec("llama_cpp") is None:
        log.warning("llama-cpp-python is not installed: serving with the torch runner (slower; `make serve` builds it)")
        return _transformers(settings)
    return _llama_cpp(settings)


def _llama_cpp(settings: EngineSettings) -> Engine:
    from chatgate.engines.llamacpp import LlamaCppEngine

    return LlamaCppEngine(settings)


def _transformers(settings: EngineSettings) -> Engine:
    from chatgate.engines.transformers import TransformersEngine

    return TransformersEngine(settings)


def _sentence_transformers(settings: EngineSettings) -> Engine:
    """An embedding model; a folder holding a sequence-classification model is a cross-encoder."""
    from chatgate.engines.cross_encoder import is_cross_encoder

    if settings.model_path != "default" and is_cross_encoder(settings.model_path):
        return _cross_encoder(settings)
    from chatgate.engines.sentence_transformers import SentenceTransformersEngine

    return SentenceTransformersEngine(settings)


def _cross_encoder(settings: EngineSettings) -> Engine:
    from chatgate.engines.cross_encoder import CrossEncoderEngine

    return CrossEncoderEngine(settings)


def _vllm(settings: EngineSettings) -> Engine:
    from chatgate.engines.vllm import VllmEngine

    return VllmEngine(settings)


def _fake(settings: EngineSettings) -> Engine:
    from chatgate.engines.fake import FakeEngine

    names = settings.model_names
    return FakeEngine(name=names[0] if names else "fake-model", token_delay=settings.fake_token_delay,
                      prefill_delay=settings.fake_prefill_delay, max_running=settings.max_running,
                      scheduling_policy=settings.scheduling_policy)


ENGINES: dict[str, Callable[[EngineSettings], Engine]] = {
    "auto": _auto,
    "llama.cpp": _llama_cpp,
    "transformers": _transformers,
    "sentence-transformers": _sentence_transformers,
    "cross-encoder": _cross_encoder,
    "fake": _fake,
    "vllm": _vllm,
}


def create_engine(settings: EngineSettings) -> Engine:
    """Build the engine `settings.engine` names."""
    try:
        factory = ENGINES[settings.engine]
    except KeyError:
        raise StartupError(
            f"unknown engine {settings.engine!r}; choose one of {', '.join(sorted(ENGINES))}"
        ) from None
    return factory(settings)
