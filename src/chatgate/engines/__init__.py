"""Engines by name: the one registry workers use to build the engine they serve."""

from __future__ import annotations

from collections.abc import Callable

from chatgate.engines.base import Engine
from chatgate.settings import EngineSettings


def _transformers(settings: EngineSettings) -> Engine:
    from chatgate.engines.transformers import TransformersEngine

    return TransformersEngine(settings)


def _sentence_transformers(settings: EngineSettings) -> Engine:
    from chatgate.engines.sentence_transformers import SentenceTransformersEngine

    return SentenceTransformersEngine(settings)


def _vllm(settings: EngineSettings) -> Engine:
    from chatgate.engines.vllm import VllmEngine

    return VllmEngine(settings)


def _fake(settings: EngineSettings) -> Engine:
    from chatgate.engines.fake import FakeEngine

    names = settings.model_names
    return FakeEngine(name=names[0] if names else "fake-model", token_delay=settings.fake_token_delay,
                      prefill_delay=settings.fake_prefill_delay)


ENGINES: dict[str, Callable[[EngineSettings], Engine]] = {
    "transformers": _transformers,
    "sentence-transformers": _sentence_transformers,
    "fake": _fake,
    "vllm": _vllm,
}


def create_engine(settings: EngineSettings) -> Engine:
    """Build the engine `settings.engine` names."""
    try:
        factory = ENGINES[settings.engine]
    except KeyError:
        raise ValueError(
            f"unknown engine {settings.engine!r}; choose one of {', '.join(sorted(ENGINES))}"
        ) from None
    return factory(settings)
