"""The sampling knobs are declared once (`protocol.worker.Sampling`); the engine contract mirrors them."""

from __future__ import annotations

import dataclasses

from chatgate.api.serving.generation import sampling_params
from chatgate.engines.base import SamplingParams
from chatgate.protocol.openai import ChatCompletionRequest
from chatgate.protocol.worker import GenerateParams, Sampling


def test_engine_sampling_params_mirror_the_protocol_knobs() -> None:
    engine = {f.name: f for f in dataclasses.fields(SamplingParams)}
    for name, field in Sampling.model_fields.items():
        assert name in engine, name
        factory = engine[name].default_factory  # MISSING, the only non-callable it can be, when there is none
        default = factory() if callable(factory) else engine[name].default
        assert (default or None) == (field.default or None), name


def test_a_request_leaving_knobs_out_gets_the_declared_defaults() -> None:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    params = GenerateParams.model_validate(sampling_params(request))
    assert Sampling.of(params) == Sampling().model_dump()


def test_knobs_a_request_sets_reach_the_worker_parameters() -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.3, "top_k": 5,
         "logit_bias": {"42": -100}, "seed": 7, "stop": ["x", ""], "presence_penalty": 0}
    )
    params = GenerateParams.model_validate(sampling_params(request))
    assert (params.temperature, params.top_k, params.logit_bias, params.seed) == (0.3, 5, {42: -100.0}, 7)
    assert params.stop_list() == ["x"] and params.presence_penalty == 0.0 and params.top_p == 1.0
