"""The runners our own engine serves the default model on, and what the `served` fixture yields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from chatgate.engines.base import Engine
from tests.support.app import Target

# The runners our own engine serves the default model on; each engine is loaded once per session.
RUNNERS = ["torch", "llama.cpp"]


def runner_engine(runner: str, **settings: Any) -> Engine:
    """Our engine on `runner` over the default model, with `EngineSettings` fields `settings`
    (skips the test where llama-cpp-python is not installed)."""
    from chatgate.settings import EngineSettings

    if runner == "llama.cpp":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")
        from chatgate.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(EngineSettings(**settings))
    from chatgate.engines.transformers import TransformersEngine

    return TransformersEngine(EngineSettings(**settings))


def runner_of(engine: Engine) -> str:
    """Which of `RUNNERS` our `engine` runs on."""
    return "llama.cpp" if type(engine).__name__ == "LlamaCppEngine" else "torch"


@dataclass
class Served:
    """The default model behind chatgate's API through one engine: `api` takes the requests,
    `worker` reports the engine's running sequences in its `/metrics`."""

    api: Target
    worker: Target
    # How far its log-probabilities may be from float32 transformers' (llama.cpp serves bfloat16).
    logprob_tolerance: float = 1e-3


# The engines the `served` fixture runs the API behaviour checks on: ours on each runner, and vLLM live.
ENGINES = [*RUNNERS, pytest.param("vllm", marks=pytest.mark.live)]
