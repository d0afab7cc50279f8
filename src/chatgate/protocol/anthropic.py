"""The public wire format of Anthropic's Messages API (`POST /v1/messages`, `/count_tokens`).

Requests are validated here as chat's are, with Anthropic's field names (`max_tokens` required,
`stop_sequences`, `system` as a string or text blocks, `tool_use` / `tool_result` blocks); the
reply, its stream events and errors carry the fields the official `anthropic` SDK reads. Images,
documents and server tools are refused by name: the served models read text only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from chatgate.protocol import limits
from chatgate.protocol.limits import PublicRequest

_Request = PublicRequest  # strict, unknown fields (`cache_control`, `citations`...) ignored


class TextBlock(_Request):
    """A `text` content block."""

    type: Literal["text"]
    text: str


class ToolUseBlock(_Request):
    """A `tool_use` block of an earlier assistant turn, sent back with its result."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=64)
    input: dict[str, Any]


class ToolResultBlock(_Request):
    """A `tool_result` block: what a tool the model called returned."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[TextBlock] = ""
    is_error: bool | None = None

    def text(self) -> str:
        """The result as one string (an error said as one)."""
        body = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {body}" if self.is_error else body


def _block_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    # Tags that are not identifiers, so error locations (`messages[0].content[1].text`) leave them out.
    return f"{kind} block"


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text block")]
    | Annotated[ToolUseBlock, Tag("tool_use block")]
    | Annotated[ToolResultBlock, Tag("tool_result block")],
    Discriminator(
        _block_kind,
        custom_error_type="invalid_block",
        custom_error_message="content blocks must be of type 'text', 'tool_use' or 'tool_result' "
        "(this server reads text only)",
    ),
]


class MessageParam(_Request):
    """One turn of the conversation."""

    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    def blocks(self) -> list[TextBlock | ToolUseBlock | ToolResultBlock]:
        """The content as blocks (a string is one text block)."""
        return [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else list(self.content)


class AnthropicTool(_Request):
    """A client tool: a name, a description and the JSON schema of its input."""

    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    # Its validity (`valid_schema`) is checked by the door, within the request's schema budget.
    input_schema: Annotated[dict[str, Any], AfterValidator(limits.bounded_schema)]

    @model_validator(mode="before")
    @classmethod
    def _client_tools_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind not in (None, "custom"):
            raise ValueError(f"tools of type {str(kind)[:64]!r} run on Anthropic's servers; only client tools are served here")
        return value


class AnthropicToolChoice(_Request):
    """`tool_choice`: `auto`, `any` (some tool), `tool` (the one named) or `none`."""

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @field_validator("name")
    @classmethod
    def _named_only_for_tool(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("type") != "tool":
            raise ValueError("name is only allowed when type is 'tool'")
        return value


class MessageMetadata(_Request):
    """`metadata`: who the end user is (an opaque id)."""

    user_id: str | None = Field(None, max_length=256)


StopSequence = Annotated[str, Field(min_length=1, max_length=limits.MAX_STOP_CHARS)]
System = str | list[TextBlock]


class Conversation(_Request):
    """What a Messages request and a token count share: the model, system, turns and tools."""

    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1, max_length=limits.MAX_MESSAGES)
    system: System | None = None
    tools: Annotated[list[AnthropicTool], Field(max_length=limits.MAX_TOOLS)] | None = None
    tool_choice: AnthropicToolChoice | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, value: AnthropicToolChoice | None, info: ValidationInfo) -> AnthropicToolChoice | None:
        names = {t.name for t in info.data.get("tools") or []}
        if value is not None and value.type in ("any", "tool") and not names:
            raise ValueError(f"tool_choice of type '{value.type}' requires tools")
        if value is not None and value.type == "tool" and value.name not in names:
            raise ValueError(f"tool_choice names '{value.name}', which is not in tools")
        return value

    def system_text(self) -> str | None:
        """The system prompt as one string, or None."""
        if self.system is None or isinstance(self.system, str):
            return self.system or None
        return "\n".join(block.text for block in self.system) or None

    def schemas(self) -> Iterable[tuple[str, dict[str, Any]]]:
        for index, tool in enumerate(self.tools or []):
            yield f"tools[{index}].input_schema", tool.input_schema

    def cost(self) -> limits.Cost:
        """Chat's caps, counted as the conversation chat is shown: a tool result is a message
        of its own, and the calls of one assistant turn count against the calls cap."""
        messages = 1 if self.system_text() else 0
        calls = 0
        for message in self.messages:
            blocks = message.blocks()
            messages += 1 + sum(isinstance(b, ToolResultBlock) for b in blocks)
            calls = max(calls, sum(isinstance(b, ToolUseBlock) for b in blocks))
        values, schema_param = limits.schemas_cost(self.schemas())
        return limits.Cost(
            messages=messages, calls=calls, tools=len(self.tools or []), schema_values=values, schema_param=schema_param
        )


class MessagesRequest(Conversation):
    """`POST /v1/messages`."""

    max_tokens: int = Field(ge=1)
    stop_sequences: Annotated[list[StopSequence], Field(max_length=limits.MAX_STOP_SEQUENCES)] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=1)
    metadata: MessageMetadata | None = None
    stream: bool | None = False


class CountTokensRequest(Conversation):
    """`POST /v1/messages/count_tokens`."""


class MessageUsage(BaseModel):
    """`usage`: tokens read and written."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class TextContent(BaseModel):
    """A `text` block of the reply."""

    type: Literal["text"] = "text"
    text: str = ""


class ToolUseContent(BaseModel):
    """A `tool_use` block of the reply: a call the client should run and answer."""

    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]

    def input_json(self) -> str:
        """The input as the JSON text an `input_json_delta` carries."""
        return json.dumps(self.input)


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageResponse(BaseModel):
    """The reply: a `message` object."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[TextContent | ToolUseContent] = Field(default_factory=list)
    model: str
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: MessageUsage = Field(default_factory=MessageUsage)


class TokenCount(BaseModel):
    """The reply of `/v1/messages/count_tokens`."""

    input_tokens: int


class MessageStreamEvent(BaseModel):
    """One event of a streamed reply; `type` names it (`message_start` ... `message_stop`)."""

    type: Literal[
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]
    message: MessageResponse | None = None
    index: int | None = None
    content_block: TextContent | ToolUseContent | None = None
    delta: dict[str, Any] | None = None
    usage: dict[str, int] | None = None

    def model_dump_json(self, **kwargs: Any) -> str:
        """Only the fields the event's type has (each type has its own shape)."""
        return super().model_dump_json(exclude_none=True, **kwargs)


class AnthropicErrorDetail(BaseModel):
    """`error` of an error body."""

    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Anthropic's error body."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail
