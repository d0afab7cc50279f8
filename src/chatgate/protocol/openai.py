"""The public wire format: OpenAI's API requests and responses, names as in OpenAI's spec.

Validation lives here, in the schema, so every malformed request is refused from one place.
Unknown request fields are accepted and ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from chatgate.protocol import limits
from chatgate.protocol.accepted import ChatExtras, CompletionExtras
from chatgate.protocol.limits import PublicRequest
from chatgate.protocol.structured import StructuredFields
from chatgate.protocol.templating import ReasoningEffort, TemplateVariables, continues_an_assistant_message
from pydantic import (
    BaseModel,
    Field,
    AfterValidator,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

Role = Literal["system", "developer", "user", "assistant", "tool"]


def new_id(prefix: str) -> str:
    """A fresh response id such as `chatcmpl-…`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix time in seconds, as `created` carries it."""
    return int(time.time())


class StreamOptions(PublicRequest):
    """`stream_options` of a streamed request."""

    include_usage: bool = False
    # OpenAI pads stream events against length side channels; accepted, and nothing is padded here.
    include_obfuscation: bool | None = None


class TextPart(PublicRequest):
    """A text part of a message's content list."""

    type: Literal["text"]
    text: str


class CalledFunction(PublicRequest):
    """The function of an earlier tool call: its name and its arguments as a JSON string."""

    name: str
    arguments: str


class MessageToolCall(PublicRequest):
    """A tool call of an earlier assistant message, as the client sends it back."""

    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(PublicRequest):
    """One message of a chat conversation."""

    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: Annotated[list[MessageToolCall], Field(max_length=limits.MAX_TOOLS)] | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message must have content")
        return self

    def text(self) -> str:
        """The message's content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def _token_id_key(key: str) -> str:
    if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) <= limits.MAX_TOKEN_ID):
        raise ValueError(f"logit_bias keys must be token ids (0 to {limits.MAX_TOKEN_ID}), got {key[:20]!r}")
    return key


StopString = Annotated[str, Field(max_length=limits.MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Field(min_length=1, max_length=limits.MAX_STOP_SEQUENCES)]
# vLLM's `cache_salt`: requests share cached prompt prefixes only with requests of the same salt
# (and, when the server checks API keys, the same key).
CacheSalt = Annotated[str, Field(min_length=1, max_length=limits.MAX_CACHE_SALT_CHARS)]
# vLLM's `priority`: under `--scheduling-policy priority`, lower runs first; a signed 64-bit integer.
Priority = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
LogitBias = Annotated[
    dict[Annotated[str, AfterValidator(_token_id_key)], Annotated[float, Field(ge=-100, le=100)]],
    Field(max_length=limits.MAX_LOGIT_BIAS),
]


class SamplingRequest(StructuredFields):
    """Fields shared by chat and completion requests (the structured-output ones in `StructuredFields`)."""

    model: str = Field(min_length=1)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # Beyond these, one step's logits overflow to inf or collapse to 0 (HF's penalty divides).
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    logit_bias: LogitBias | None = None
    seed: int | None = Field(None, ge=limits.SEED_MIN, le=limits.SEED_MAX)
    stop: StopString | StopList | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: CacheSalt | None = None
    priority: Priority = 0

    def scheduling_priority(self) -> int | None:
        return self.priority if "priority" in self.model_fields_set else None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 1:
            raise ValueError("top_k must be -1 (disabled) or at least 1")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def stop_list(self) -> list[str]:
        """Stop sequences as a list, empty strings left out."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def valid_schema(value: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema (tool parameters, `response_format`), refused here when malformed."""
    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as exc:
        raise ValueError(f"invalid JSON schema: {exc.message}") from None
    return value


class JsonSchemaFormat(PublicRequest):
    """`response_format.json_schema`."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # Its validity (`valid_schema`) is checked by the door, within the request's schema budget.
    schema_: Annotated[dict[str, Any], AfterValidator(limits.bounded_schema)] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(PublicRequest):
    """`response_format`: free text, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self

    def constraint(self) -> dict[str, Any] | None:
        """The decoding constraint for the worker, or None for free text."""
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.type == "json_schema" and self.json_schema is not None:
            return {"type": "json_schema", "schema": self.json_schema.schema_}
        return None


class FunctionDefinition(PublicRequest):
    """A function the model may call."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    # Its validity (`valid_schema`) is checked by the door, within the request's schema budget.
    parameters: Annotated[dict[str, Any], AfterValidator(limits.bounded_schema)] = Field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    strict: bool | None = None


class Tool(PublicRequest):
    """`tools[]`: a function tool."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(PublicRequest):
    """Names one function."""

    name: str


class NamedToolChoice(PublicRequest):
    """`tool_choice` naming the function to call."""

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(SamplingRequest, ChatExtras):
    """`POST /v1/chat/completions` (and FastChat's `/api/v1/chat/completions`)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=limits.MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[Tool], Field(max_length=limits.MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = True
    functions: Annotated[list[FunctionDefinition], Field(max_length=limits.MAX_TOOLS)] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None
    reasoning_effort: ReasoningEffort | None = None
    # vLLM's templating fields (`protocol/templating.py`; README, "Reasoning models and templating").
    chat_template_kwargs: TemplateVariables | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    _continues = field_validator("continue_final_message")(continues_an_assistant_message)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, value: Any, info: ValidationInfo) -> Any:
        names = {t.function.name for t in info.data.get("tools") or []}
        if value is not None and value != "none" and not names:
            raise ValueError("tool_choice is only allowed when tools are given")
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"tool_choice names '{value.function.name}', which is not in tools")
        return value

    @field_validator("function_call")
    @classmethod
    def _function_call_names_a_function(cls, value: Any, info: ValidationInfo) -> Any:
        names = {f.name for f in info.data.get("functions") or []}
        if isinstance(value, FunctionName) and value.name not in names:
            raise ValueError(f"function_call names '{value.name}', which is not in functions")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    def other_constraints(self) -> list[str]:
        forced = [self.response_format is not None and self.response_format.type != "text",
                  self.tool_choice not in (None, "none", "auto"), isinstance(self.function_call, FunctionName)]
        return [name for name, given in zip(("response_format", "tool_choice", "function_call"), forced) if given]

    def schemas(self) -> Iterable[tuple[str, dict[str, Any]]]:
        yield from self.structured_schemas()
        for index, tool in enumerate(self.tools or []):
            yield f"tools[{index}].function.parameters", tool.function.parameters
        for index, function in enumerate(self.functions or []):
            yield f"functions[{index}].parameters", function.parameters
        if self.response_format is not None and self.response_format.json_schema is not None:
            yield "response_format.json_schema.schema", self.response_format.json_schema.schema_

    def cost(self) -> limits.Cost:
        values, schema_param = limits.schemas_cost(self.schemas())
        entries, detail = 0, ""
        if self.logprobs and not self.stream:
            entries, detail = limits.logprob_entries(
                choices=self.n, alternatives=self.top_logprobs or 0, tokens=self.completion_limit()
            )
        return limits.Cost(
            choices=self.n,
            logprob_entries=entries,
            logprob_param="top_logprobs" if self.top_logprobs else "logprobs",
            logprob_detail=detail,
            schema_values=values,
            schema_param=schema_param,
            messages=len(self.messages),
            tools=len(self.tools or self.functions or []),
            tools_param="tools" if self.tools else "functions",
        )

    def logprob_count(self) -> int | None:
        """Alternatives per token to return, or None for no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def completion_limit(self) -> int | None:
        """The requested completion budget, if any."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _no_empty_prompt(value: str) -> str:
    if not value:
        raise ValueError("prompt must not be empty")
    return value


PromptText = Annotated[str, AfterValidator(_no_empty_prompt)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = (
    PromptText
    | Annotated[list[PromptText], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionRequest(SamplingRequest, CompletionExtras):
    """`POST /v1/completions`."""

    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    # Filled in the middle where the model has FIM tokens (the worker refuses it elsewhere).
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    # vLLM's completions take it too: the prompt is continued as JSON (or JSON of a schema).
    response_format: ResponseFormat | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix_without_echo(cls, value: str | None, info: ValidationInfo) -> str | None:
        # The echoed prompt would be the prefix alone, the text read as if it ended there.
        if value is not None and info.data.get("echo"):
            raise ValueError("suffix cannot be combined with echo")
        return value

    @field_validator("prompt")
    @classmethod
    def _choices_capped(cls, value: Any, info: ValidationInfo) -> Any:
        choices = prompt_count(value) * info.data.get("n", 1)
        if choices > limits.MAX_COMPLETION_CHOICES:
            raise ValueError(
                f"{prompt_count(value)} prompts × n={info.data.get('n', 1)} would make {choices} "
                f"completions; at most {limits.MAX_COMPLETION_CHOICES} are allowed"
            )
        return value

    # Completions carry token-id lists: up to 128 prompts of a long context.
    max_json_values: ClassVar[int] = 1_100_000

    def other_constraints(self) -> list[str]:
        return ["response_format"] if self.response_format is not None and self.response_format.type != "text" else []

    def constraint(self) -> dict[str, Any] | None:
        """The worker-protocol constraint on the output: `response_format`'s or the structured fields'."""
        given = self.response_format.constraint() if self.response_format is not None else None
        return given or self.structured_constraint()

    def schemas(self) -> Iterable[tuple[str, dict[str, Any]]]:
        yield from self.structured_schemas()
        if self.response_format is not None and self.response_format.json_schema is not None:
            yield "response_format.json_schema.schema", self.response_format.json_schema.schema_

    def cost(self) -> limits.Cost:
        choices = prompt_count(self.prompt) * self.n
        values, schema_param = limits.schemas_cost(self.schemas())
        entries, detail = 0, ""
        if self.logprobs is not None and not self.stream:
            # `echo` scores each choice's prompt as well; a token is at least one UTF-8 byte.
            entries, detail = limits.logprob_entries(
                choices=choices, alternatives=self.logprobs, tokens=self.max_tokens,
                scored=max(map(prompt_length_bound, prompts_in(self.prompt)), default=0) if self.echo else 0,
            )
        return limits.Cost(
            choices=choices, choices_param="n" if self.n > 1 else "prompt",
            logprob_entries=entries, logprob_param="logprobs", logprob_detail=detail,
            schema_values=values, schema_param=schema_param,
        )


def prompts_in(prompt: Any) -> list[Any]:
    """The prompts a completions `prompt` holds: each a string or a token-id list."""
    if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def prompt_count(prompt: Any) -> int:
    """How many prompts a completions `prompt` holds (one string or token list, or a list)."""
    return len(prompts_in(prompt))


def prompt_length_bound(prompt: str | list[int]) -> int:
    """The most tokens one prompt can take: its token count, or its UTF-8 bytes (no token is
    shorter than a byte)."""
    return len(prompt) if isinstance(prompt, list) else len(prompt.encode("utf-8", "surrogatepass"))


# Responses ------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """What went wrong: OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error response's body."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    """`usage.prompt_tokens_details`."""

    cached_tokens: int = 0  # prompt tokens served from the prefix cache (0 where unknown)


class CompletionTokensDetails(BaseModel):
    """`usage.completion_tokens_details`: what the completion tokens were spent on."""

    reasoning_tokens: int = 0


class Usage(BaseModel):
    """Token accounting of a response."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # Always present, as OpenAI sends it.
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    # Present where thinking is told apart from the answer (a reasoning parser, an upstream's count).
    completion_tokens_details: CompletionTokensDetails | None = None

    @model_serializer(mode="wrap")
    def _drop_unknown_details(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("completion_tokens_details") is None:
            data.pop("completion_tokens_details", None)
        return data

    def add(self, other: Usage) -> None:
        """Accumulate another usage into this one."""
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        self.prompt_tokens_details.cached_tokens += other.prompt_tokens_details.cached_tokens
        if other.completion_tokens_details is not None:
            details = self.completion_tokens_details or CompletionTokensDetails()
            details.reasoning_tokens += other.completion_tokens_details.reasoning_tokens
            self.completion_tokens_details = details


FinishReason = Literal["stop", "length", "tool_calls", "function_call", "content_filter"] | None


class FunctionCall(BaseModel):
    """A call's function: its name and its arguments as a JSON string."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One tool call of an assistant message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    """The message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None  # vLLM's field: the thinking, with a reasoning parser
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None

    @model_serializer(mode="wrap")
    def _drop_unused_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if k == "content" or v is not None}


class TopLogprob(BaseModel):
    """An alternative token and its log-probability."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    """A generated token's log-probability, with the most likely alternatives."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """`choices[].logprobs` of a chat completion (or chunk)."""

    content: list[ChatTokenLogprob] | None


class CompletionLogprobs(BaseModel):
    """`choices[].logprobs` of a text completion (or chunk), in the legacy shape."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    """A chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """The delta of a streamed chat choice; unset fields are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    """One choice of a chat completion chunk."""

    index: int
    delta: ChatDelta
    finish_reason: FinishReason = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """A streamed chat completion chunk."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    """One choice of a text completion (also used for streamed chunks)."""

    index: int
    text: str
    finish_reason: FinishReason = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    """A text completion, or one streamed chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


Capability = Literal["chat", "completions", "embeddings"]


class ModelCard(BaseModel):
    """One entry of `/v1/models`."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "chatgate"
    # Extension: what the model serves, so a client (the playground) can offer chat models for
    # chat and embedding models for embeddings; left out when the worker could not be asked.
    capabilities: list[Capability] | None = None


class ModelList(BaseModel):
    """`GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
