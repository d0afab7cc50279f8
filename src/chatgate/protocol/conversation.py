"""FastChat's conversation templates, as data: what `/worker_get_conv_template` carries.

A FastChat worker has no chat template of its own to apply; the API server builds the prompt
from the worker's conversation template, as FastChat's API server does. `render` reproduces
FastChat's prompt layouts for the separator styles in common use; a chatgate worker describes
its model's Jinja template in the same terms (`chatml_conversation`) so FastChat's API server can
front it.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from chatgate.errors import WorkerError


class SeparatorStyle(IntEnum):
    """FastChat's separator styles, numbered as FastChat numbers them."""

    ADD_COLON_SINGLE = 1
    ADD_COLON_TWO = 2
    ADD_COLON_SPACE_SINGLE = 3
    NO_COLON_SINGLE = 4
    NO_COLON_TWO = 5
    ADD_NEW_LINE_SINGLE = 6
    LLAMA2 = 7
    CHATGLM = 8
    CHATML = 9


class Conversation(BaseModel):
    """A FastChat conversation template (the fields FastChat's API server reads)."""

    model_config = ConfigDict(extra="ignore")

    name: str = "chatgate"
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: list[str] = Field(default_factory=lambda: ["USER", "ASSISTANT"])
    messages: list[list[Any]] = Field(default_factory=list)
    offset: int = 0
    sep_style: int = SeparatorStyle.ADD_COLON_SINGLE
    sep: str = "\n"
    sep2: str | None = None
    stop_str: str | list[str] | None = None
    stop_token_ids: list[int] | None = None


def _text(message: Any) -> str:
    return str(message[0] if isinstance(message, (list, tuple)) else message)


def render(conv: Conversation, messages: list[dict[str, Any]]) -> str:
    """The prompt FastChat's API server would build for `messages` with template `conv`."""
    system = conv.system_message
    turns: list[tuple[str, str | None]] = [(str(r), _text(m) if m else None) for r, m in conv.messages]
    for message in messages:
        role, content = message.get("role"), str(message.get("content") or "")
        if role in ("system", "developer"):
            system = content
        elif role == "user":
            turns.append((conv.roles[0], content))
        elif role == "assistant":
            turns.append((conv.roles[1], content))
    turns.append((conv.roles[1], None))
    head = conv.system_template.format(system_message=system)
    return _layout(SeparatorStyle(conv.sep_style), conv, head, turns)


def _layout(style: SeparatorStyle, conv: Conversation, head: str, turns: list[tuple[str, str | None]]) -> str:
    seps = [conv.sep, conv.sep2 or conv.sep]
    if style in (SeparatorStyle.ADD_COLON_SINGLE, SeparatorStyle.ADD_COLON_TWO, SeparatorStyle.ADD_COLON_SPACE_SINGLE):
        two = style == SeparatorStyle.ADD_COLON_TWO
        open_end = ": " if style == SeparatorStyle.ADD_COLON_SPACE_SINGLE else ":"
        out = head + conv.sep
        for i, (role, text) in enumerate(turns):
            out += f"{role}: {text}{seps[i % 2] if two else conv.sep}" if text else role + open_end
        return out
    if style in (SeparatorStyle.NO_COLON_SINGLE, SeparatorStyle.NO_COLON_TWO):
        two = style == SeparatorStyle.NO_COLON_TWO
        out = head
        for i, (role, text) in enumerate(turns):
            out += f"{role}{text}{seps[i % 2] if two else conv.sep}" if text else role
        return out
    if style in (SeparatorStyle.ADD_NEW_LINE_SINGLE, SeparatorStyle.CHATML):
        tail = "\n" if style == SeparatorStyle.CHATML else ""
        out = head + conv.sep + tail if head else ""
        for role, text in turns:
            out += f"{role}\n{text}{conv.sep}{tail}" if text else f"{role}\n"
        return out
    raise WorkerError(f"The worker's conversation template style {style.name} is not supported.")


def chatml_conversation(rendered_probe: str, *, stop_token_ids: list[int]) -> Conversation | None:
    """Describe a ChatML Jinja template as a FastChat conversation, from a rendered probe.

    `rendered_probe` is the template's rendering of one user message "{probe}"; a default
    system message the template inserts is carried over. Other template families return None.
    """
    start, end = "<|im_start|>", "<|im_end|>"
    if start not in rendered_probe or end not in rendered_probe:
        return None
    system = ""
    head = f"{start}system\n"
    if rendered_probe.startswith(head):
        system = rendered_probe[len(head) : rendered_probe.index(end)]
    return Conversation(
        name="chatml",
        system_template=f"{start}system\n{{system_message}}",
        system_message=system,
        roles=[f"{start}user", f"{start}assistant"],
        sep_style=SeparatorStyle.CHATML,
        sep=end,
        stop_str=end,
        stop_token_ids=stop_token_ids,
    )


def generic_conversation() -> Conversation:
    """A plain `USER:` / `ASSISTANT:` conversation, for a worker whose template is unknown here."""
    return Conversation(
        name="chatgate-generic",
        system_template="{system_message}",
        roles=["USER", "ASSISTANT"],
        sep_style=SeparatorStyle.ADD_COLON_SINGLE,
        sep="\n",
    )
