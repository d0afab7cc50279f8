"""The engine contract: the one thing in chatgate that touches a model.

An engine turns prompt token ids and sampling parameters into an async stream of text deltas,
and knows its tokenizer, chat template and context length. Workers hold one engine; engines are
found by name in `chatgate.engines.create_engine`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatgate.engines.memory import MemoryNeed
from chatgate.errors import InvalidRequestError, ModelNotFoundError
from chatgate.settings import SchedulingPolicy


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one sequence is sampled and when it stops."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    # A compiled decoding constraint from `Engine.compile_constraint`, owned by the engine.
    constraint: Any = None
    # Log-probabilities: None for none, else the chosen token's plus this many alternatives.
    logprobs: int | None = None
    # Prompts share cached prefixes (KV) only with prompts under the same salt; None is the
    # shared cache. The API server derives it from the caller's API key and `cache_salt`.
    cache_salt: str | None = None
    # Under the priority scheduling policy, lower runs first (vLLM's meaning); ties by arrival.
    priority: int = 0
    # The LoRA adapter (by its served name) this sequence runs through; None: the base model.
    lora: str | None = None

    @property
    def greedy(self) -> bool:
        """Whether sampling reduces to argmax."""
        return self.temperature < 1e-5 or self.top_k == 1


@dataclass(frozen=True, kw_only=True)
class ChatOptions:
    """How a conversation is templated beyond its messages, tools and generation prompt."""

    # The prompt ends inside the last (assistant) message, so the reply continues it.
    continue_final_message: bool = False
    template: str | None = None  # a Jinja chat template in place of the model's own
    variables: Mapping[str, Any] = field(default_factory=dict)  # extra template variables (`chat_template_kwargs`)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, and the most likely alternatives at its step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True, kw_only=True)
class Phases:
    """When a sequence waited, prefilled and decoded (`time.time_ns()`), for its trace: an
    engine that keeps its own queue reports them on the sequence's last output."""

    queued: int  # handed to the engine
    admitted: int | None  # its prefill began (None: it never started)
    first_token: int | None  # its first token was sampled
    finished: int
    preemptions: int = 0


@dataclass(frozen=True, kw_only=True)
class GenerationOutput:
    """What one sequence produced since its last output."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of the text, when asked for
    stop_sequence: str | None = None  # the stop string that ended the sequence, if one did
    # Prompt tokens whose KV came from the prefix cache when the sequence was first admitted
    # (0 where the engine cannot tell); a readmission after preemption does not change it.
    cached_tokens: int = 0
    phases: Phases | None = None  # on the last output, from engines that time their phases


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Static facts about the served model."""

    name: str
    context_length: int
    vocab_size: int
    generates: bool = True
    embedding_dim: int = 0
    cross_encoder: bool = False  # scores text pairs (`score_pairs`): a sequence-classification model
    tools_in_template: bool = False  # the chat template renders `tools` itself
    scheduling_policy: SchedulingPolicy = "fcfs"  # "priority": requests' `priority` is honoured


@dataclass(frozen=True, kw_only=True)
class EngineStats:
    """What an engine reports on its worker's /metrics: work done and saved, memory held."""

    prefill_tokens: int = 0  # prompt tokens run through the model
    prefix_cache_hits: int = 0  # prompts that started from cached KV
    prefix_cache_reused_tokens: int = 0  # prompt tokens copied from the cache instead of prefilled
    prefix_cache_bytes: int = 0  # memory the prefix cache holds now
    kv_cache_budget_tokens: int = 0  # KV the running batch may hold (0: unbounded)
    kv_cache_used_tokens: int = 0  # KV the admitted sequences hold (rows x the longest row)
    preemptions: int = 0  # sequences that gave their KV back, to be prefilled again later
    running_sequences: int = 0  # sequences in the running batch


class Engine(abc.ABC):
    """A loaded model that generates text. Compute never runs on the event loop; `encode`,
    `decode`, `render_chat` and `encode_chat` are safe to call from any thread."""

    info: ModelInfo

    async def start(self) -> None:
        """Load the model and start background work."""

    async def close(self) -> None:
        """Stop background work and free the model."""

    async def unload(self) -> None:
        """Free the model's memory until `start` loads it again (`/v1/models/unload`, idle unload)."""
        await self.close()

    def memory_need(self) -> MemoryNeed | None:
        """What loading the model takes, estimated from its files before `start` (None: unknown,
        not checked). Reads files: call it in a thread."""
        return None

    @abc.abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`."""

    @abc.abstractmethod
    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`, special tokens left out unless asked for."""

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own string, as the tokenizer's vocabulary spells it."""
        return [self.decode([token], skip_special_tokens=False) for token in token_ids]

    def special_token(self, text: str) -> int | None:
        """The id of the one special token `text` spells (such as `<fim_prefix>`), or None when
        the vocabulary has no such token."""
        ids = self.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 and self.token_strings(ids) == [text] else None

    @abc.abstractmethod
    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
        add_generation_prompt: bool = True, options: ChatOptions | None = None,
    ) -> str:
        """The prompt text for a conversation (and the tools on offer, if the model's template
        renders them), with the generation prompt appended unless told not to."""

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
        add_generation_prompt: bool = True, options: ChatOptions | None = None,
    ) -> tuple[list[int], str]:
        """Token ids and text of a conversation's prompt. Engines whose tokenizer has special
        tokens keep special-token text inside message content as plain text."""
        text = self.render_chat(messages, tools, add_generation_prompt=add_generation_prompt, options=options)
        return self.encode(text, add_special_tokens=False), text

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationOutput]:
        """Stream the completion of `prompt_ids`; closing the iterator aborts the sequence."""

    def pending(self) -> int:
        """Sequences running or waiting in this engine."""
        return 0

    def stats(self) -> EngineStats | None:
        """Counters for /metrics, if the engine keeps any."""
        return None

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end a turn."""
        return []

    async def prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first)."""
        raise InvalidRequestError(
            f"The model `{self.info.name}` cannot score prompt tokens (echo with logprobs).", param="logprobs"
        )

    def compile_constraint(self, spec: dict[str, Any]) -> Any:
        """Compile a `response_format` constraint for `SamplingParams.constraint`."""
        raise InvalidRequestError(
            f"The model `{self.info.name}` does not support structured output.",
            param=str(spec.get("param") or "response_format"),
        )

    def lora_names(self) -> list[str]:
        """The LoRA adapters served beside this model, by name (`SamplingParams.lora`)."""
        return []

    async def load_lora(self, name: str, path: str) -> None:
        """Serve the adapter at `path` as `name` (vLLM's `/v1/load_lora_adapter`)."""
        raise InvalidRequestError(
            f"The model `{self.info.name}` is served by an engine that serves no LoRA adapters.", param="lora_path"
        )

    async def unload_lora(self, name: str) -> None:
        """Stop serving adapter `name`, once the requests running through it have finished."""
        raise ModelNotFoundError(f"The LoRA adapter `{name}` is not loaded.", param="lora_name")

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One L2-normalised vector per token-id list, in order; batched by the engine."""
        raise InvalidRequestError(
            f"The model `{self.info.name}` does not serve embeddings.", param="model"
        )

    def pair_tokens(self, first: str, second: str) -> int:
        """Tokens a cross-encoder reads for a pair of texts."""
        raise self._no_pairs()

    async def score_pairs(self, pairs: list[tuple[str, str]]) -> list[float]:
        """A cross-encoder's relevance score of each pair of texts, in order."""
        raise self._no_pairs()

    def _no_pairs(self) -> InvalidRequestError:
        return InvalidRequestError(f"The model `{self.info.name}` is not a cross-encoder.", param="model")
