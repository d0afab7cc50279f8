"""Typed settings for each chatgate process, read from flags and `CHATGATE_*` environment.

Each process has one settings class; the CLI builds its flags from the class's fields
(`api_keys` becomes `--api-keys`), so a flag and its environment variable always agree.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

StrList = Annotated[list[str], NoDecode]

DEFAULT_CHAT_MODEL = "default"
# Reasoning parsers by vLLM's names; `engines.reasoning.PARSERS` implements each.
ReasoningParser = Literal["deepseek_r1", "qwen3"]


def _split_list(value: Any) -> Any:
    """Accept a JSON list (FastChat's form) or a comma-separated string."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def default_cache_dir() -> Path:
    """Where converted models are cached: `$XDG_CACHE_HOME/chatgate` or `~/.cache/chatgate`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chatgate"


# How an engine orders waiting requests (vLLM's --scheduling-policy).
SchedulingPolicy = Literal["fcfs", "priority"]


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATGATE_", extra="ignore")

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as one JSON object per line for log shippers."
    )


class TracingSettings(_Base):
    """Where a serving process sends its traces (`chatgate.tracing`)."""

    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP collector to send traces to: a base URL (http://collector:4318; "
        "/v1/traces is added) or the full traces URL. Unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_ENDPOINT if set, else no tracing.",
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (OTLP over HTTP)")
        return value or None


class ShutdownSettings(_Base):
    """How a serving process drains on SIGTERM (`chatgate.drain`)."""

    shutdown_timeout: float = Field(
        30.0, ge=0, description="Seconds running streams may take to finish after SIGTERM (new "
        "work is refused meanwhile); the ones still running then end with an error event.",
    )


class WorkerSilenceSettings(_Base):
    """How long an API server waits on a silent worker that sends keep-alive frames."""

    worker_silence_timeout: float = Field(
        5.0, gt=0, description="Seconds a chatgate worker that sends keep-alive frames may stay "
        "silent before it counts as frozen (its request moves to another worker if nothing was "
        "generated yet); FastChat workers get --worker-first-frame-timeout and --worker-frame-timeout.",
    )
    worker_keepalive_interval: float = Field(
        1.0, gt=0, le=60, description="Seconds of silence after which such a worker sends a keep-alive frame.",
    )


class ApiSettings(ShutdownSettings, TracingSettings):
    """Settings of the OpenAI-compatible API server."""

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, description="Port to bind.")
    log_prompts: bool = Field(
        False, description="Put the start of each request's messages, prompt or input (4,096 characters) in "
        "its access line; without it no prompt text is logged at any level."
    )
    api_keys: StrList = Field(
        default_factory=list,
        description="Accepted API keys, comma-separated; none means no key is checked.",
    )
    admin_keys: StrList = Field(
        default_factory=list,
        description="Keys that may also read /metrics and every model's workers on /ready, "
        "comma-separated (accepted as API keys too); with API keys set, only these may.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="YAML or JSON file of API keys, each with optional name, rpm, tpm, "
        "max_parallel_requests and models; accepted beside --api-keys.",
    )
    redis_url: str | None = Field(
        None, description="Keep per-key rate-limit counters and stored responses in this Redis (shared by replicas)."
    )
    allowed_origins: StrList = Field(
        default_factory=list, description="CORS allowed origins (JSON list or comma-separated)."
    )
    allowed_methods: StrList = Field(
        default_factory=lambda: ["*"], description="CORS allowed methods."
    )
    allowed_headers: StrList = Field(
        default_factory=lambda: ["*"], description="CORS allowed headers."
    )
    allow_credentials: bool = Field(False, description="CORS: allow credentials.")
    ssl: bool = Field(
        False, description="Serve HTTPS with the SSL_KEYFILE and SSL_CERTFILE environment files."
    )
    ssl_keyfile: str | None = Field(None, description="TLS private key file.")
    ssl_certfile: str | None = Field(None, description="TLS certificate file.")
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    max_n: int = Field(16, ge=1, description="Largest `n` a request may ask for.")
    stream_write_timeout: float = Field(
        30.0, gt=0, description="Seconds a client may leave its stream unread before it is cancelled."
    )
    limit_concurrency: int = Field(
        1024, ge=1, description="Most open connections and requests (uvicorn answers 503 beyond)."
    )
    timeout_keep_alive: int = Field(
        5, ge=1, description="Seconds an idle keep-alive connection stays open."
    )
    docs: bool = Field(
        False, description="Serve /docs, /redoc and /openapi.json (behind the API key)."
    )
    responses_ttl: float = Field(
        30 * 24 * 3600, gt=0, description="Seconds a stored Responses API response is kept (`store`, default 30 days)."
    )
    responses_max_count: int = Field(
        10_000, ge=1, description="Most stored responses kept per key (a key over it loses its own oldest, never another key's)."
    )
    responses_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="Most bytes of stored responses and their stream events kept per key (a key over it loses its own oldest)."
    )
    responses_store: Literal["auto", "sqlite", "redis", "memory"] = Field(
        "auto", description="Where stored responses are kept: sqlite (a file, see --responses-path), redis (--redis-url, "
        "shared by replicas), memory (this process, lost on restart); auto: redis with --redis-url, else sqlite."
    )
    responses_path: Path | None = Field(
        None, description="The SQLite file of stored responses (default: responses.sqlite3 in the cache directory)."
    )
    responses_max_background: int = Field(
        64, ge=0, description="Most `background` responses this API server runs at once (429 beyond)."
    )
    responses_max_background_per_key: int = Field(
        8, ge=0, description="Most `background` responses one API key runs at once on this server (429 beyond)."
    )
    playground: bool = Field(
        True, description="Serve the browser playground at / (--no-playground turns it off)."
    )

    _split = field_validator(
        "api_keys", "admin_keys", "allowed_origins", "allowed_methods", "allowed_headers", mode="before"
    )(_split_list)

    @model_validator(mode="after")
    def _redis_store_has_a_url(self) -> ApiSettings:
        # Refused with the other flags, before any model loads, not once the app starts.
        if self.responses_store == "redis" and not self.redis_url:
            raise ValueError("--responses-store redis needs --redis-url")
        return self

    def tls_files(self) -> tuple[str | None, str | None]:
        """Key and certificate files, taking FastChat's SSL_* variables when `--ssl` is set."""
        key, cert = self.ssl_keyfile, self.ssl_certfile
        if self.ssl:
            key = key or os.environ.get("SSL_KEYFILE")
            cert = cert or os.environ.get("SSL_CERTFILE")
        return key, cert


class EngineSettings(_Base):
    """Settings of the model a worker serves."""

    model_path: str = Field(
        DEFAULT_CHAT_MODEL,
        description="Model to serve: 'default' (embedded SmolLM2), a local HF folder or a .gguf file.",
    )
    model_names: StrList = Field(
        default_factory=list, description="Names the model is served under (comma-separated)."
    )
    engine: str = Field(
        "auto",
        description="Engine: llama.cpp (GGUF files on llama.cpp's kernels), transformers (torch), fake, vllm "
        "(needs vLLM installed), openai (forward to --upstream-url), or auto: llama.cpp for a GGUF file "
        "where llama-cpp-python is installed, else transformers.",
    )
    device: str = Field("cpu", description="Torch device.")
    num_threads: int = Field(
        0, ge=0, description="Compute threads (0: llama.cpp every core; torch every core but one, which serves HTTP)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "int8"] = Field(
        "auto",
        description="Chat model weights: float32 (exact), bfloat16 or int8 (torch: dynamic-quantized "
        "linears, CPU only; llama.cpp: Q8_0); the smaller ones are faster and answer worse (see the "
        "README). auto: bfloat16 on llama.cpp, float32 on torch and vLLM. llama.cpp converts only "
        "the default model; a GGUF file of your own is served as it is.",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir, description="Where converted models are cached."
    )
    max_waiting: int | None = Field(
        None, ge=1, description="Most requests a worker holds that have not started (429 beyond; default: no "
        "bound but --limit-worker-concurrency)."
    )
    max_queue_wait: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Seconds a request may wait at a worker for its first token "
        "(queue and prefill); past it, a 503 with Retry-After (default: no bound)."
    )
    limit_worker_concurrency: int = Field(
        64, ge=1, description="Most requests a worker runs or queues at once (429 beyond)."
    )
    fake_token_delay: float = Field(
        0.0, ge=0, description="Seconds per token of the fake engine (for tests and demos)."
    )
    fake_prefill_delay: float = Field(
        0.0, ge=0, description="Seconds the fake engine takes before its first token (a long prefill)."
    )
    max_running: int = Field(
        32, ge=1, description="Most sequences decoded together in one batch; the rest queue."
    )
    scheduling_policy: SchedulingPolicy = Field(
        "fcfs",
        description="Which waiting request runs first: fcfs (first come, first served; a request's "
        "non-zero `priority` is refused) or priority (lower `priority` first, ties by arrival; one "
        "outranking a running request may preempt it when the batch or the KV budget is full).",
    )
    kv_cache_gib: float | None = Field(
        None, gt=0, le=1 << 20, allow_inf_nan=False,
        description="Memory (GiB) for the running batch's KV cache: a request waits until its "
        "prompt + max_tokens fits beside the running ones, and one that never could is refused "
        "(400). Default: a quarter of the memory free after loading, at most --max-running full contexts "
        "(llama.cpp, which allocates it up front: --max-running x 512 tokens, at least one context).",
    )
    reasoning_parser: ReasoningParser | None = Field(
        None,
        description="Split chat replies into reasoning_content and content at <think>...</think> "
        "(vLLM's parser names): deepseek_r1 (the opening tag may be left out: the template gave it) "
        "or qwen3. Default: none, the whole reply is content.",
    )
    chat_template: Path | None = Field(
        None, description="Jinja chat template file to use in place of the model's own.",
    )
    prefix_cache_gib: float = Field(
        0.25, ge=0, le=1 << 20, allow_inf_nan=False,
        description="Memory (GiB) for the KV of recent prompts, so a request sharing a prefix "
        "with an earlier one (a system prompt) prefills only the rest; 0 turns it off.",
    )

    memory_headroom_gib: float = Field(
        0.5, ge=0, le=1 << 20, allow_inf_nan=False,
        description="Memory (GiB) a model load must leave free: a model (at start, on /v1/models/load, "
        "when it loads again after --idle-unload) or LoRA adapter whose weights and up-front KV cache "
        "would leave less of the memory available (the host's, within any cgroup limit; the GPU's on "
        "CUDA) is refused naming the sizes (409 insufficient_memory; at start the process exits).",
    )
    memory_check: bool = Field(
        True, description="Check that a model fits in memory before loading it (--no-memory-check: load anyway).",
    )
    idle_unload: float | None = Field(
        None, gt=0, le=10**9, allow_inf_nan=False,
        description="Seconds without a request after which the model is freed; it stays listed and the "
        "next request loads it again (its first token waits for the load). Default: never.",
    )
    lora: StrList = Field(
        default_factory=list,
        description="LoRA adapters served as models of their own beside the base model, as name=PATH "
        "(repeatable): a PEFT adapter folder on the torch engine (Llama-family models), a GGUF LoRA file on "
        "llama.cpp (convert PEFT adapters with llama.cpp's convert_lora_to_gguf.py).",
    )

    upstream_url: str | None = Field(
        None, description="openai engine: base URL of the OpenAI-compatible server (e.g. http://host:8000/v1)."
    )
    upstream_api_key: str | None = Field(None, description="openai engine: API key sent to the upstream.")
    upstream_model: str | None = Field(
        None, description="openai engine: model name sent upstream (default: the name requested)."
    )
    upstream_wait: float = Field(
        300.0, ge=0, description="openai engine: seconds to wait at start for the upstream's /v1/models."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Context length: caps the model's own (llama.cpp, transformers; KV is sized "
        "for it), or gives it where the engine cannot tell (openai: when the upstream does not say)."
    )

    # vLLM's engine flags (--engine vllm), passed through as given; unset ones keep vLLM's defaults.
    tensor_parallel_size: int | None = Field(None, ge=1, description="vllm engine: GPUs per model replica.")
    pipeline_parallel_size: int | None = Field(None, ge=1, description="vllm engine: pipeline stages.")
    distributed_executor_backend: str | None = Field(
        None, description="vllm engine: mp, ray (multi-node) or uni."
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vllm engine: share of GPU memory for weights and KV cache."
    )
    enforce_eager: bool = Field(
        False,
        description="vllm engine: run the model eagerly, without torch.compile or CUDA graphs (on this "
        "2-core CPU it starts 3.5x faster and decodes ~8% slower).",
    )

    @model_validator(mode="after")
    def _model_exists(self) -> EngineSettings:
        # A --model-path given that names no model stops the start here, before anything loads.
        if "model_path" in self.model_fields_set:
            _served_name(self)
        return self

    @field_validator("chat_template")
    @classmethod
    def _readable_template(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"no chat template file at {path}")
        return path

    def chat_template_text(self) -> str | None:
        """The `--chat-template` file's text, if one is given."""
        return self.chat_template.read_text(encoding="utf-8") if self.chat_template is not None else None

    def weights(self, auto: str) -> str:
        """`dtype`, with `auto` standing for `auto` (the runner's own choice)."""
        return auto if self.dtype == "auto" else self.dtype

    # Named apart from ApiSettings' validator: ServeSettings inherits both, and one name would hide the other.
    _split_names = field_validator("model_names", "lora", mode="before")(_split_list)


# Settings that belong to a process, not to one of its models: a --model spec may not set them.
_NOT_PER_MODEL = frozenset({"model_path", "log_level", "log_format"})


def _model_spec(spec: str, base: EngineSettings) -> EngineSettings:
    """One `--model` spec: the model path, then `key=value` words setting that model's engine
    flags (`gemma3-270m model-names=gemma max-model-len=2048`); the rest come from `base`."""
    words = shlex.split(spec)
    if not words:
        raise ValueError("--model is empty: want a model path, then key=value settings")
    overrides: dict[str, Any] = {"model_path": words[0], "model_names": []}
    for word in words[1:]:
        key, equals, value = word.partition("=")
        field = key.strip().lstrip("-").replace("-", "_")
        if not equals or field not in EngineSettings.model_fields or field in _NOT_PER_MODEL:
            raise ValueError(
                f"--model {spec!r}: {word!r} is not KEY=VALUE with KEY an engine setting "
                "(model-names, engine, num-threads, max-model-len, max-running, kv-cache-gib, dtype, ...)"
            )
        overrides[field] = value
    fields = {name: getattr(base, name) for name in EngineSettings.model_fields}
    try:
        return EngineSettings(**{**fields, **overrides})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()
        )
        raise ValueError(f"--model {spec!r}: {problems}") from None


# Engines that load weights from --model-path themselves (the others take any name).
_LOCAL_ENGINES = frozenset({"auto", "llama.cpp", "transformers"})


def _served_name(chat: EngineSettings) -> str:
    """The name a model is served under by default; a path that is not a model stops the start."""
    if chat.engine not in _LOCAL_ENGINES:
        return chat.model_path
    from chatgate.engines.loading import resolve_chat_model

    try:
        return resolve_chat_model(chat.model_path).name
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None


class ModelsSettings(EngineSettings):
    """Engine settings plus `--model`: several models served by one process."""

    model: StrList = Field(
        default_factory=list, json_schema_extra={"one_per_flag": True},
        description="A model to serve, repeatable (one process serves them all): its path as "
        "--model-path takes it, then optional KEY=VALUE settings of its own (engine flags without "
        "the dashes), e.g. --model default --model 'gemma3-270m model-names=gemma max-model-len=2048'. "
        "Unset keys take the command's flags. Environment: a JSON list of specs.",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _specs(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment: a JSON list, or one spec
            return json.loads(value) if value.strip().startswith("[") else [value]
        return value

    @model_validator(mode="after")
    def _valid_models(self) -> ModelsSettings:
        if self.model and {"model_path", "model_names"} & self.model_fields_set:
            raise ValueError("give the models with --model (repeatable) or one with --model-path/--model-names, not both")
        names: list[str] = []
        for chat in self.chat_models():
            default = _served_name(chat) if self.model else None  # checks each --model's path
            names += chat.model_names or ([default] if default else [])
        if len(set(names)) < len(names):
            raise ValueError(f"two models are served under one name: {sorted(n for n in set(names) if names.count(n) > 1)}")
        return self

    def chat_models(self) -> list[EngineSettings]:
        """Settings of each chat model to serve: every --model, else the one --model-path names.

        With several models on local cores, each engine's unset --num-threads becomes an even
        share of the cores but one (the HTTP server's), so engines do not fight over cores."""
        if not self.model:
            return [self]
        models = [_model_spec(spec, self) for spec in self.model]
        share = max(1, ((os.cpu_count() or 1) - 1) // len(models))
        return [m if m.num_threads else m.model_copy(update={"num_threads": share}) for m in models]


class ServeSettings(ApiSettings, ModelsSettings):
    """Settings of `chatgate serve`: API server and workers in one process."""

    embedding_model_path: str = Field(
        "auto",
        description="Embedding model served beside the chat model: 'default' (embedded "
        "all-MiniLM-L6-v2), a local sentence-transformers folder, 'none', or 'auto' (the default "
        "one, except with --engine openai, whose upstream serves its own embeddings if any).",
    )

    def embedding_engine_settings(self) -> EngineSettings | None:
        """Settings of the embedding engine, or None when it is turned off."""
        path = self.embedding_model_path.lower()
        if path in {"", "none"} or (path == "auto" and self.engine == "openai"):
            return None
        return EngineSettings(
            **{
                **{name: getattr(self, name) for name in EngineSettings.model_fields},
                "engine": "sentence-transformers",
                "model_path": "default" if path == "auto" else self.embedding_model_path,
                "model_names": [],
                "lora": [],  # adapters belong to the chat model
            }
        )


class FleetSettings(_Base):
    """How a fleet process trusts its peers: the shared key, and a CA bundle for HTTPS."""

    fleet_key: str | None = Field(
        None,
        description="Shared secret of the fleet: sent to, and required by, controller and "
        "workers (Bearer). Unset: no key (a fleet with FastChat parts runs keyless).",
    )
    fleet_ca_bundle: str | None = Field(
        None, description="CA bundle (PEM) to verify the fleet's HTTPS certificates with."
    )

    def fleet_headers(self) -> dict[str, str]:
        """Headers that carry the fleet key, if there is one."""
        return {"Authorization": f"Bearer {self.fleet_key}"} if self.fleet_key else {}



class FleetServerSettings(FleetSettings):
    """A controller's or worker's own TLS files."""

    ssl_keyfile: str | None = Field(None, description="TLS private key file (serve HTTPS).")
    ssl_certfile: str | None = Field(None, description="TLS certificate file (serve HTTPS).")

    def scheme(self) -> str:
        """`https` when this process serves TLS."""
        return "https" if self.ssl_certfile else "http"


class ApiProcessSettings(ApiSettings, FleetSettings, WorkerSilenceSettings):
    """Settings of `chatgate api`: the API server in front of a controller."""

    controller_address: str = Field("http://localhost:21001", description="Controller URL.")
    worker_table_refresh: float = Field(
        1.0, gt=0, description="Seconds between refreshes of the API server's worker table."
    )
    controller_timeout: float = Field(
        2.0, gt=0, description="Seconds a call to the controller may take (the table is kept meanwhile)."
    )
    worker_connect_timeout: float = Field(
        3.0, gt=0, description="Seconds to connect to a worker before trying another."
    )
    worker_first_frame_timeout: float = Field(
        60.0, gt=0, description="Seconds a worker may take to its first answer before another is tried."
    )
    worker_frame_timeout: float = Field(
        30.0, gt=0, description="Seconds a worker may stay silent between two stream frames."
    )
    worker_max_frame_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest stream frame accepted from a worker."
    )
    worker_max_connections: int = Field(
        512, ge=1, description="Most connections open to workers at once."
    )
    worker_pool_timeout: float = Field(
        5.0, gt=0, description="Seconds to wait for a free worker connection before a 503."
    )


class WorkerSettings(ModelsSettings, FleetServerSettings, ShutdownSettings, TracingSettings):
    """Settings of `chatgate worker`: one model (`--model-path`) or several (`--model`, repeatable)."""

    host: str = Field("localhost", description="Address to bind.")
    port: int = Field(21002, description="Port to bind.")
    worker_address: str | None = Field(
        None, description="URL the controller reaches this worker at (default from host/port)."
    )
    controller_address: str = Field("http://localhost:21001", description="Controller URL.")
    no_register: bool = Field(False, description="Do not register with the controller (run alone).")
    heartbeat_interval: float = Field(
        5.0, gt=0, description="Seconds between heartbeats to the controller."
    )

    def address(self) -> str:
        """The URL this worker announces."""
        return self.worker_address or f"{self.scheme()}://{self.host}:{self.port}"


class ControllerSettings(FleetServerSettings, TracingSettings):
    """Settings of `chatgate controller`."""

    host: str = Field("localhost", description="Address to bind.")
    port: int = Field(21001, description="Port to bind.")
    dispatch_method: Literal["lottery", "shortest_queue"] = Field(
        "shortest_queue", description="How a worker is picked for a model."
    )
    heartbeat_expiration: float = Field(
        15.0, gt=0, description="Seconds without a heartbeat before a worker is dropped."
    )
    probe_timeout: float = Field(
        2.0, gt=0, description="Seconds a worker has to answer the controller's status probe."
    )
    max_workers: int = Field(1024, ge=1, description="Most workers the controller keeps.")


class BenchSettings(EngineSettings):
    """Settings of `chatgate bench`: closed-loop streaming load and the reference points."""

    url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible base URL to load.")
    model: str = Field("SmolLM2-135M-Instruct", description="Model name to request.")
    api_key: str = Field("bench", description="API key to send.")
    concurrency: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [1, 8, 16], description="Concurrency levels (comma-separated)."
    )
    max_tokens: int = Field(128, ge=1, description="max_tokens of every request.")
    requests_per_client: int = Field(3, ge=1, description="Requests each client sends per level.")
    ramp_up: float = Field(
        4.0,
        ge=0,
        description="Seconds over which a level's clients start, evenly spaced (0: all at once).",
    )
    target: StrList = Field(
        default_factory=list,
        description="Named URLs to load side by side, NAME=URL (repeat the flag or separate with "
        "commas); the first is compared with the others. Default: --url, named http.",
    )
    http: bool = Field(True, description="Load --url over HTTP when no --target is named.")
    raw: bool = Field(False, description="Also drive the engine in-process, with no HTTP (the ceiling).")
    hf_baseline: bool = Field(False, description="Also time plain HF generate, one sequence.")
    quality: bool = Field(
        False, description="Also print each runner's quality gate (--dtype's greedy tokens and log-probabilities "
        "against float32's) and every target's greedy answers against float32's."
    )
    output_dir: str = Field("bench-results", description="Where bench.json and bench.png go.")

    _split = field_validator("model_names", "concurrency", "target", mode="before")(_split_list)

    @field_validator("target")
    @classmethod
    def _named_targets(cls, targets: list[str]) -> list[str]:
        names = [entry.partition("=")[0] for entry in targets]
        for entry, name in zip(targets, names, strict=True):
            if "=" not in entry or not name or not entry.partition("=")[2]:
                raise ValueError(f"want NAME=URL, got {entry!r}")
        if len(set(names)) < len(names) or "raw" in names:
            raise ValueError("target names must be distinct and not 'raw' (the in-process engine)")
        return targets


class SoakSettings(_Base):
    """Settings of `chatgate soak`: a fleet under mixed traffic, with kills and restarts."""

    minutes: float = Field(10.0, ge=1, description="How long the soak runs.")
    kill_every: float = Field(120.0, gt=0, description="Seconds between kill -9 and restart of a worker.")
    controller_restart_at: float | None = Field(
        None, ge=0, description="Second at which the controller is killed and restarted (default: halfway)."
    )
    clients: int = Field(6, ge=1, description="Concurrent closed-loop clients.")
    request_timeout: float = Field(30.0, gt=0, description="Seconds after which a request counts as hung.")
    grace: float = Field(3.0, ge=0, description="Seconds after a kill within which failures are explained by it.")
    token_delay: float = Field(0.01, ge=0, description="Seconds per token of the workers' fake engine.")
    output_dir: str = Field("soak-results", description="Where soak.json and soak.png go.")
