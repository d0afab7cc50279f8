"""The public wire format of OpenAI's Responses API (`POST /v1/responses`; responses stored and
continued with `store` and `previous_response_id` are kept by `chatgate.api.stored.store`).

Requests are validated here like chat's; responses and stream events carry the fields the
official SDK reads (`output_text`, `usage`, `status`, `sequence_number`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from chatgate.errors import InvalidRequestError
from chatgate.protocol import limits
from chatgate.protocol.accepted import ResponsesExtras, Verbosity
from chatgate.protocol.limits import PublicRequest
from chatgate.protocol.openai import CacheSalt, FunctionDefinition, Priority
from chatgate.protocol.templating import ReasoningEffort

InputRole = Literal["user", "system", "developer", "assistant"]
# OpenAI's `include` values. Only output logprobs apply to a text-only server; the others name
# outputs it never makes (searches, images, reasoning), so they add nothing, as with OpenAI when
# no such item is produced.
Includable = Literal[
    "message.output_text.logprobs",
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
]


_Request = PublicRequest  # strict, unknown fields ignored, every value JSON- and UTF-8-safe


class InputTextPart(_Request):
    """A text part of an input message (`output_text` when an earlier answer is sent back)."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(_Request):
    """A message item of `input` (the `type` may be left out, as in OpenAI's easy form)."""

    type: Literal["message"] = "message"
    role: InputRole
    content: str | list[InputTextPart]

    def text(self) -> str:
        """The message's content as one string."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallInput(_Request):
    """An earlier `function_call` output item, sent back with its result."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputInput(_Request):
    """`function_call_output`: what a function the model called returned."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str


class ReasoningInput(_Request):
    """An earlier `reasoning` output item sent back; templates leave past thinking out, so is it."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: Annotated[list[dict[str, Any]], Field(max_length=limits.MAX_MESSAGES)] = Field(default_factory=list)
    content: Annotated[list[dict[str, Any]], Field(max_length=limits.MAX_MESSAGES)] | None = None
    encrypted_content: str | None = None
    status: str | None = None


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    # Tags that are not identifiers, so error locations (`input[0].role`) leave them out.
    return f"{kind} item"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message item")]
    | Annotated[FunctionCallInput, Tag("function_call item")]
    | Annotated[FunctionCallOutputInput, Tag("function_call_output item")]
    | Annotated[ReasoningInput, Tag("reasoning item")],
    Discriminator(_item_kind),
]


class FunctionTool(_Request):
    """A function tool (the only kind a stateless local server can run)."""

    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    # Its validity (`valid_schema`) is checked by the door, within the request's schema budget.
    parameters: Annotated[dict[str, Any], AfterValidator(limits.bounded_schema)] = Field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    strict: bool | None = None

    def definition(self) -> FunctionDefinition:
        """The chat-completions form of this tool."""
        return FunctionDefinition(name=self.name, description=self.description, parameters=self.parameters, strict=self.strict)


class NamedFunction(_Request):
    """`tool_choice: {"type": "function", "name": ...}`."""

    type: Literal["function"]
    name: str


class TextFormat(_Request):
    """`text.format`: free text, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema":
            if self.schema_ is None or self.name is None:
                raise ValueError("name and schema are required when type is 'json_schema'")
            limits.bounded_schema(self.schema_)  # its validity: checked by the door
        return self


class TextConfig(_Request):
    """`text`: how the output text is formatted."""

    format: TextFormat | None = None
    verbosity: Verbosity | None = None


class ReasoningConfig(_Request):
    """`reasoning`: the effort goes to a chat template with a `reasoning_effort` switch."""

    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(ResponsesExtras):  # a `_Request`, with the fields it accepts but cannot act on
    """`POST /v1/responses`."""

    model: str = Field(min_length=1)
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    include: list[Includable] | None = None
    reasoning: ReasoningConfig | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    cache_salt: CacheSalt | None = None
    priority: Priority = 0
    store: bool | None = None  # None: kept, as OpenAI's default
    previous_response_id: str | None = Field(None, min_length=1, max_length=256)
    background: bool | None = None  # run after the reply; needs `store`

    def scheduling_priority(self) -> int | None:
        return self.priority if "priority" in self.model_fields_set else None

    @property
    def logprobs(self) -> bool:
        """Whether output text comes with log-probabilities (`top_logprobs` alone asks for none)."""
        return "message.output_text.logprobs" in (self.include or [])

    def schemas(self) -> Iterable[tuple[str, dict[str, Any]]]:
        for index, tool in enumerate(self.tools or []):
            yield f"tools[{index}].parameters", tool.parameters
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_schema" and fmt.schema_ is not None:
            yield "text.format.schema", fmt.schema_

    def cost(self) -> limits.Cost:
        """Chat's caps, counted as the conversation chat is shown: the instructions and one
        message per input item, consecutive function calls being one assistant turn."""
        messages, calls, run = (1 if self.instructions else 0), 0, 0
        items: list[object] = [*self.input] if isinstance(self.input, list) else [self.input]
        for item in items:
            run = run + 1 if isinstance(item, FunctionCallInput) else 0
            calls = max(calls, run)
            messages += run <= 1
        entries, detail = 0, ""
        if self.logprobs and not self.stream:
            entries, detail = limits.logprob_entries(
                choices=1, alternatives=self.top_logprobs or 0, tokens=self.max_output_tokens
            )
        values, schema_param = limits.schemas_cost(self.schemas())
        return limits.Cost(
            messages=messages, messages_param="input", calls=calls, calls_param="input",
            logprob_entries=entries, logprob_param="top_logprobs", logprob_detail=detail,
            schema_values=values, schema_param=schema_param,
            tools=len(self.tools or []),
        )

    @field_validator("background")
    @classmethod
    def _background_is_stored(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value and info.data.get("store") is False:
            raise ValueError("background responses must be stored: store must be true or left out")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, value: Any, info: ValidationInfo) -> Any:
        names = {t.name for t in info.data.get("tools") or []}
        if value not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice requires tools")
        if isinstance(value, NamedFunction) and value.name not in names:
            raise ValueError(f"tool_choice names '{value.name}', which is not in tools")
        return value


class OutputText(BaseModel):
    """An `output_text` content part."""

    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    """A `message` output item."""

    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class FunctionCallOutput(BaseModel):
    """A `function_call` output item: a call the client should run and answer."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class ReasoningText(BaseModel):
    """A `reasoning_text` content part: the model's thinking, as it wrote it."""

    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


class ReasoningOutput(BaseModel):
    """A `reasoning` output item: the thinking a reasoning parser split from the answer (no
    summary: none is generated)."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    encrypted_content: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = ReasoningOutput | OutputMessage | FunctionCallOutput


class InputTokensDetails(BaseModel):
    """`usage.input_tokens_details`."""

    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    """`usage.output_tokens_details`."""

    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    """`usage` of a response."""

    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class IncompleteDetails(BaseModel):
    """Why a response is incomplete."""

    reason: Literal["max_output_tokens", "content_filter"]


class RetrieveQuery(BaseModel):
    """The query of `GET /v1/responses/{id}`: the response whole, or (`stream`) its events
    replayed, those after number `starting_after`."""

    model_config = ConfigDict(extra="ignore")

    stream: bool = False
    starting_after: int | None = Field(None, ge=0, le=10**9)


def _listed(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as OpenAI lists it: a message's text content as one content part."""
    if item.get("type") != "message" or not isinstance(item.get("content"), str):
        return item
    part = "output_text" if item.get("role") == "assistant" else "input_text"
    return {**item, "content": [{"type": part, "text": item["content"]}]}


class InputItemsQuery(BaseModel):
    """The query of `GET /v1/responses/{id}/input_items`: a page of at most `limit` items, newest
    first unless `order` is `asc`, after (or before) the item id given, as OpenAI pages lists."""

    model_config = ConfigDict(extra="ignore")

    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = Field(None, min_length=1, max_length=256)
    before: str | None = Field(None, min_length=1, max_length=256)

    def page(self, items: list[dict[str, Any]]) -> InputItemList:
        """This query's page of `items` (given in input order); 400 naming a cursor not among them."""
        ordered = items if self.order == "asc" else items[::-1]
        ids = [item.get("id") for item in ordered]
        start, end = 0, len(ordered)
        for name, cursor in (("after", self.after), ("before", self.before)):
            if cursor is None:
                continue
            if cursor not in ids:
                raise InvalidRequestError(f"No input item of this response has the id {cursor!r}.", param=name)
            if name == "after":
                start = ids.index(cursor) + 1
            else:
                end = ids.index(cursor)
        window = [_listed(item) for item in ordered[start:end]]
        # Paging backwards (`before` alone) takes the items nearest the cursor.
        data = window[-self.limit:] if self.before is not None and self.after is None else window[: self.limit]
        return InputItemList(
            data=data, first_id=data[0]["id"] if data else None, last_id=data[-1]["id"] if data else None,
            has_more=len(data) < len(window),
        )


class DeletedResponse(BaseModel):
    """The reply of `DELETE /v1/responses/{id}`."""

    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class InputItemList(BaseModel):
    """The reply of `GET /v1/responses/{id}/input_items`: a response's own input, in order."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class ResponseObject(BaseModel):
    """The `response` object, complete or (in stream events) in progress."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    metadata: dict[str, str] = Field(default_factory=dict)
    store: bool = False
    background: bool = False
    previous_response_id: str | None = None


class StreamEvent(BaseModel):
    """One event of a streamed response; `type` names it, the rest depends on the type."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int
