"""The internal wire format between API server, controller and workers.

It is FastChat's controller/worker protocol, so chatgate and FastChat processes can front each
other. chatgate's additions are optional fields that FastChat ignores: `messages` (the worker
applies the model's own chat template), `prompt_token_ids`, `delta` (stream deltas instead of
cumulative text), `cache_salt`, `priority`, `keepalive` and `param` on errors, and
`cached_tokens` in usage. A worker advertises them in `/model_details`.

Keep-alive: a request with `keepalive: s` (sent only to workers advertising `EXT_KEEPALIVE`) gets
`KEEPALIVE_FRAME` on its stream whenever `s` seconds pass without a chunk (queued, prefilling,
or between tokens), so the API server can take a few seconds of silence for a frozen worker
without cutting a long prefill short. The frame is not a chunk: readers drop it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator, model_validator

from chatgate.protocol import limits

# Extensions a chatgate worker advertises in /model_details under "chatgate_extensions".
EXT_CHAT_TEMPLATE = "chat_template"
EXT_DELTA = "delta"
EXT_TOKEN_IDS = "prompt_token_ids"
EXT_TOKENIZE = "tokenize"  # /tokenize and /detokenize
EXTENSIONS = (EXT_CHAT_TEMPLATE, EXT_DELTA, EXT_TOKEN_IDS, EXT_TOKENIZE)
# KEEPALIVE_FRAME on request (see the module docstring): the worker's HTTP routes add it, so
# every backend behind them (engines and upstreams alike) advertises it.
EXT_KEEPALIVE = "keepalive"

# The keep-alive frame, byte for byte (NUL-delimited like every frame); never a `WorkerChunk`.
KEEPALIVE_FRAME = b'{"keepalive":true}'
MAX_KEEPALIVE_INTERVAL = 60.0


class Sampling(BaseModel):
    """How tokens are drawn: the one declaration of the sampling knobs and their defaults
    (OpenAI's, and what a request leaves out). `engines.base.SamplingParams` mirrors them for
    the engine contract; a unit test keeps the two alike."""

    model_config = ConfigDict(extra="ignore")

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None

    @classmethod
    def of(cls, source: BaseModel) -> dict[str, Any]:
        """The sampling fields `source` sets, defaults for the rest (None counts as unset)."""
        given = source.model_dump(include=set(cls.model_fields), exclude_none=True)
        return cls.model_validate(given).model_dump()


class GenerateParams(Sampling):
    """Body of `/worker_generate_stream` and `/worker_generate` (FastChat's `params`)."""

    model: str = ""
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    max_new_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    echo: bool = False
    # Completions' `suffix`: the prompt is the prefix of a fill-in-the-middle prompt (`prompt`
    # or `prompt_token_ids`), and this text follows the gap; refused where the model has no FIM tokens.
    suffix: str | None = None
    delta: bool = False
    # chatgate extension: {"type": "json_object"} or {"type": "json_schema", "schema": {...}},
    # optionally with "distinct": <property>, the top-level array whose first repeated item ends it.
    response_format: dict[str, Any] | None = None
    # Log-probabilities: the chosen token's plus this many alternatives (None: none).
    logprobs: int | None = None
    # Tools on offer (OpenAI's `tools`) and the conversation without chatgate's generic tool
    # prompt: a worker whose chat template renders tools itself uses these instead of `messages`.
    tools: list[dict[str, Any]] | None = None
    tool_messages: list[dict[str, Any]] | None = None
    # OpenAI's `tool_choice` for those tools, for workers that forward them to an upstream.
    tool_choice: str | dict[str, Any] | None = None
    # Prompts share cached prefixes only under one salt: a digest of the caller's API key and
    # the request's `cache_salt` (`api.auth.cache_salt`), never either of them in the clear.
    cache_salt: str | None = Field(None, min_length=1, max_length=limits.MAX_CACHE_SALT_CHARS)
    # Lower runs first under the priority scheduling policy (refused, unless 0, under fcfs).
    priority: int = Field(0, ge=-(2**63), le=2**63 - 1)
    # The caller's key floor (`min_priority`): under the priority policy the request runs no more
    # urgently than this; first come, first served ignores it, as it is no priority the client asked.
    priority_floor: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    # Which request field the prompt came from, so errors can name it.
    prompt_param: str = "prompt"
    max_tokens_param: str = "max_tokens"
    # Seconds of silence after which the worker sends KEEPALIVE_FRAME (None: never).
    keepalive: float | None = Field(None, gt=0, le=MAX_KEEPALIVE_INTERVAL)
    # Chat templating, as vLLM's chat request has it: extra template variables, whether the
    # prompt opens the assistant's turn, or ends inside the last (assistant) message instead;
    # `reasoning_effort` joins the variables (an upstream gets it as the field).
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    reasoning_effort: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data: Any) -> Any:
        # FastChat's API server sends null for parameters a request left out.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    def prompt_key(self) -> tuple[object, ...]:
        """What identifies the prompt (choices of one prompt share it)."""
        return (
            self.prompt, str(self.messages), tuple(self.prompt_token_ids or ()), str(self.chat_template_kwargs),
            self.add_generation_prompt, self.continue_final_message, self.reasoning_effort,
        )

    def stop_list(self) -> list[str]:
        """Stop strings as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


FinishReason = Literal["stop", "length"]


def finish_reason_of(value: object) -> FinishReason | None:
    """Why a generation ended, as the API knows it: None while it runs, "length" at the token
    limit, and "stop" for any other end a worker reports (an engine or FastChat worker may
    name a stop token or string its own way)."""
    if not value:
        return None
    return "length" if value == "length" else "stop"


class WorkerUsage(BaseModel):
    """Token accounting of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # chatgate extension: prompt tokens served from the engine's prefix cache (0: none or unknown).
    cached_tokens: int = Field(0, ge=0)
    # Completion tokens spent thinking, where a reasoning parser (or an upstream) tells them apart.
    reasoning_tokens: int | None = None


class TokenAlternative(BaseModel):
    """One candidate token at a step, with its log-probability."""

    token_id: int
    token: str
    logprob: float


class WorkerLogprob(TokenAlternative):
    """A generated token's log-probability and the top alternatives at its step."""

    top: list[TokenAlternative] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """A prompt token's log-probability given the tokens before it (none for the first)."""

    token_id: int
    token: str
    logprob: float | None
    top: list[TokenAlternative] = Field(default_factory=list)


class WorkerChunk(BaseModel):
    """One NUL-delimited JSON object of `/worker_generate_stream` (FastChat's shape)."""

    text: str = ""
    # chatgate extension: thinking split from `text` by the worker's reasoning parser (or an
    # upstream's `reasoning_content`); only on delta streams.
    reasoning_content: str = ""
    error_code: int = 0
    usage: WorkerUsage | None = None
    finish_reason: Annotated[FinishReason | None, BeforeValidator(finish_reason_of)] = None
    param: str | None = None
    token_logprobs: list[WorkerLogprob] | None = None  # chatgate extension, one per token
    # With echo and logprobs, on the first chunk: one per prompt token (None for the first).
    prompt_logprobs: list[PromptLogprob] | None = None
    stop_sequence: str | None = None  # chatgate extension: the stop string that ended the text


class EmbedParams(BaseModel):
    """Body of `/worker_get_embeddings`: FastChat's texts, or chatgate's token ids."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    input: list[str] | None = None
    input_token_ids: list[list[int]] | None = None


class EmbedResult(BaseModel):
    """Response of `/worker_get_embeddings` (FastChat's shape, plus per-input token counts)."""

    embedding: list[list[float]]
    token_num: int
    token_counts: list[int] = Field(default_factory=list)


class ScorePairsParams(BaseModel):
    """Body of a chatgate worker's `/worker_score`: text pairs for a cross-encoder."""

    model: str = ""
    pairs: list[tuple[str, str]]


class ScorePairsResult(BaseModel):
    """Response of `/worker_score`: each pair's score, in order, and the tokens read."""

    scores: list[float]
    token_num: int


class ModelQuery(BaseModel):
    """Body of `/model_details` and `/worker_get_conv_template`: which of the worker's models
    (FastChat's API server sends it; a worker serving one model may be asked without it)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None


class CountTokenRequest(BaseModel):
    """Body of `/count_token`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None


class TokenizeParams(BaseModel):
    """Body of a chatgate worker's `/tokenize`: a prompt, or a conversation to template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeResult(BaseModel):
    """Response of `/tokenize`: the token ids, and each token's text when asked for."""

    tokens: list[int]
    token_strs: list[str] | None = None
    context_length: int


class DetokenizeParams(BaseModel):
    """Body of a chatgate worker's `/detokenize`."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResult(BaseModel):
    """Response of `/detokenize`."""

    prompt: str


# Bounds on what a worker may claim: dispatch divides by speed and sums queues, and every
# model name ends up in each API server's /v1/models.
MAX_MODEL_NAMES = 64
MAX_MODEL_NAME_LENGTH = 256
MAX_SPEED = 1e9
MAX_QUEUE_LENGTH = 1_000_000
MAX_ADDRESS_LENGTH = 2048

ModelName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_MODEL_NAME_LENGTH)]
QueueLength = Annotated[int, Field(ge=0, le=MAX_QUEUE_LENGTH)]


def check_worker_address(address: str) -> str:
    """An http(s) URL with a host, or ValueError."""
    if len(address) > MAX_ADDRESS_LENGTH:
        raise ValueError(f"a worker address is at most {MAX_ADDRESS_LENGTH} characters")
    try:
        parts = urlsplit(address)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the worker address must be an http:// or https:// URL with a host")
    return address


WorkerAddress = Annotated[str, Field(max_length=MAX_ADDRESS_LENGTH)]


class WorkerStatus(BaseModel):
    """A worker's status, as it reports it to the controller (bounded: see MAX_*)."""

    model_names: list[ModelName] = Field(max_length=MAX_MODEL_NAMES)
    speed: float = Field(1.0, gt=0, le=MAX_SPEED, allow_inf_nan=False)
    queue_length: QueueLength = 0


class RegisterWorker(BaseModel):
    """Body of the controller's `/register_worker`."""

    worker_name: WorkerAddress
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None
    multimodal: bool = False

    _address = field_validator("worker_name")(check_worker_address)


class HeartBeat(BaseModel):
    """Body of the controller's `/receive_heart_beat`."""

    worker_name: WorkerAddress
    queue_length: QueueLength = 0


class WorkerEntry(BaseModel):
    """One row of the controller's worker table (`/list_workers`, a chatgate extension)."""

    address: str
    model_names: list[str]
    speed: float = 1.0
    queue_length: int = 0


class WorkerTable(BaseModel):
    """Response of `/list_workers`: the live workers, and how the controller dispatches."""

    workers: list[WorkerEntry] = Field(default_factory=list)
    dispatch_method: str = "shortest_queue"
    # The controller started moments ago and its workers are still registering again, so the
    # table may be incomplete: an API server adds to its copy but drops nothing from it yet.
    settling: bool = False


class WorkerDown(BaseModel):
    """Body of the controller's `/report_worker_down` (a chatgate extension)."""

    worker_name: WorkerAddress


class ModelDetails(BaseModel):
    """Response of `/model_details`."""

    model_config = ConfigDict(extra="allow")

    context_length: int
    chatgate_extensions: list[str] = Field(default_factory=list)
    # Most requests the worker runs or queues at once (429 beyond): the API server refuses a
    # request of more choices than that, which could never be admitted whole. None: unknown.
    concurrency: int | None = None
    generates: bool = True
    embedding_dim: int = 0
    cross_encoder: bool = False  # scores text pairs jointly (`/worker_score`)
