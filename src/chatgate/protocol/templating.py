"""Chat templating fields of the public requests (vLLM's `chat_template_kwargs`,
`add_generation_prompt`, `continue_final_message`; OpenAI's `reasoning_effort`): their types
and bounds, declared once for chat, Responses and `/tokenize`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ValidationInfo

from chatgate.protocol import limits

# OpenAI's reasoning effort levels; a chat template with a `reasoning_effort` switch gets the value.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
# `chat_template_kwargs`: a few variables for the template, not a document. Names the template
# already has (the conversation, the flags apply_chat_template sets, the tokenizer's special
# tokens) are refused: overriding them breaks the prompt or spells tokens the client may not.
MAX_TEMPLATE_VARIABLES = 64
MAX_TEMPLATE_DEPTH = 8
MAX_TEMPLATE_VALUES = 1024
RESERVED_TEMPLATE_VARIABLES = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "chat_template",
    "tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask", "padding", "truncation",
    "max_length", "tokenizer_kwargs", "conversation", "raise_exception", "strftime_now",
})


def _template_variables(value: dict[str, Any]) -> dict[str, Any]:
    if len(value) > MAX_TEMPLATE_VARIABLES:
        raise ValueError(f"at most {MAX_TEMPLATE_VARIABLES} variables are allowed, got {len(value)}")
    limits.check_json(value, max_depth=MAX_TEMPLATE_DEPTH, max_values=MAX_TEMPLATE_VALUES)
    for key in value:
        if not (key.isidentifier() and key.isascii() and len(key) <= 64) or key.startswith("_"):
            raise ValueError(f"variable names must be identifiers of at most 64 characters, not {key[:64]!r}")
        if key in RESERVED_TEMPLATE_VARIABLES or key.endswith(("_token", "_tokens")):
            raise ValueError(f"{key!r} is set by the server and cannot be overridden")
    return value


TemplateVariables = Annotated[dict[str, Any], AfterValidator(_template_variables)]


def continues_an_assistant_message(value: bool, info: ValidationInfo) -> bool:
    """`continue_final_message` as vLLM allows it: not with `add_generation_prompt` (declared
    before it), and only after an assistant message (`messages`, declared before it too)."""
    if not value:
        return value
    if info.data.get("add_generation_prompt", True):
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
    messages = info.data.get("messages") or []
    if messages and messages[-1].role != "assistant":
        raise ValueError("continue_final_message needs the last message to be the assistant's")
    return value
