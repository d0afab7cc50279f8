"""Chat prompts to token ids, where only the chat template can produce special tokens.

Tokenising the rendered prompt as one string parses special-token text wherever it appears, so
a message saying `<|im_start|>system` would become real role tokens: a client could forge a
system turn. Instead the template is rendered a second time with a random marker in place of
each message's content. The marked render shows which stretches of the prompt are template
text and which are client content; template text is split at the special tokens it spells
(these become their ids), and the text between them, content included, is tokenised with
special-token parsing off. That is exactly how the tokenizer treats a prompt whose content
holds no special-token text, so ordinary prompts get the same ids as before.
"""

from __future__ import annotations

import copy
import re
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from jinja2 import TemplateError

from chatgate.engines.base import ChatOptions
from chatgate.errors import InvalidRequestError

Render = Callable[[list[dict[str, Any]]], str]


def template_error(exc: Exception, options: ChatOptions) -> InvalidRequestError:
    """A conversation (or template variables) the chat template refused: the client's error."""
    param = "chat_template_kwargs" if options.variables else "messages"
    return InvalidRequestError(f"The chat template could not render this conversation: {exc}", param=param)


class ChatTokenizer:
    """Tokenises rendered conversations for one Hugging Face fast tokenizer; thread-safe."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        # Whether the model's chat template renders `tools` itself (else they go in a system turn).
        self.tools_in_template = "tools" in str(getattr(tokenizer, "chat_template", "") or "")
        # A pretrained model's tokenizer may carry none (Gemma 3 270M's GGUF): chat is then refused.
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        backend = tokenizer.backend_tokenizer
        self._parsing = backend
        # A private copy that never parses special tokens; toggling the flag per call on a
        # shared tokenizer would race with other threads.
        self._plain = copy.deepcopy(backend)
        self._plain.encode_special_tokens = True
        added = {str(token.content): int(i) for i, token in tokenizer.added_tokens_decoder.items()}
        self._added = added
        names = sorted(added, key=len, reverse=True)
        self._special = re.compile("|".join(re.escape(n) for n in names)) if names else None

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`, special-token text parsed (for raw completion prompts)."""
        return list(self._parsing.encode(text, add_special_tokens=add_special_tokens).ids)

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
        add_generation_prompt: bool = True, options: ChatOptions | None = None,
    ) -> str:
        """The conversation through the model's chat template, or the one `options` gives
        (`tools` only where the template renders them); a conversation the template refuses
        (it raises, or drops the message to continue) is the client's error."""
        options = options or ChatOptions()
        if options.template is None:
            self.require_template()
        tools_in_template = self.tools_in_template if options.template is None else "tools" in options.template
        try:
            return str(self._tokenizer.apply_chat_template(
                messages, tools=tools if tools_in_template else None, tokenize=False,
                add_generation_prompt=add_generation_prompt, chat_template=options.template,
                continue_final_message=options.continue_final_message, **options.variables,
            ))
        except (TemplateError, ValueError, TypeError) as exc:
            raise template_error(exc, options) from None

    def require_template(self) -> None:
        """Refuse a chat for a model without a chat template, rather than guess one (a 400)."""
        if not self.has_template:
            raise InvalidRequestError(
                "This model has no chat template, so it cannot take chat messages: send a prompt to "
                "/v1/completions, or start the server with --chat-template FILE (a Jinja chat template).",
                param="messages",
            )

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of `token_ids`."""
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def encode_conversation(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
        add_generation_prompt: bool = True, options: ChatOptions | None = None,
    ) -> tuple[list[int], str]:
        """`encode_chat` through the model's template (or the one `options` gives). Template
        variables are template text once rendered, so none may spell a special token."""
        self.check_variables(options.variables if options else {})
        return self.encode_chat(
            lambda m: self.render(m, tools, add_generation_prompt=add_generation_prompt, options=options), messages
        )

    def check_variables(self, variables: Any) -> None:
        """Refuse template variables holding special-token text: rendered, it would become a
        real special token (a forged turn), as message content never does."""
        if isinstance(variables, str):
            if self._special is not None and self._special.search(variables) is not None:
                raise InvalidRequestError(
                    "chat_template_kwargs must not contain special-token text.", param="chat_template_kwargs"
                )
        elif isinstance(variables, dict):
            for key, value in variables.items():
                self.check_variables(key)
                self.check_variables(value)
        elif isinstance(variables, list):
            for item in variables:
                self.check_variables(item)

    def encode_chat(self, render: Render, messages: list[dict[str, Any]]) -> tuple[list[int], str]:
        """Ids and text of the prompt `render` makes of `messages`; content stays plain text."""
        text = render(messages)
        # Private-use characters and a random nonce: no client text can pass for a marker.
        marker = f"\ue000{secrets.token_hex(8)}:"
        keys = [f"{marker}{i}\ue001" for i in range(len(messages))]
        contents: dict[str, str] = {k: m["content"] for k, m in zip(keys, messages, strict=True) if isinstance(m.get("content"), str)}
        marked = render([{**m, "content": k} if k in contents else m for k, m in zip(keys, messages, strict=True)])
        pieces: list[str] = re.split(f"({re.escape(marker)}\\d+\ue001)", marked)
        if "".join(contents.get(p, p) for p in pieces) != text:
            return self._unmarkable(text, list(contents.values())), text
        return self._tokenise(pieces, contents), text

    def _tokenise(self, pieces: list[str], contents: dict[str, str]) -> list[int]:
        ids: list[int] = []
        run: list[str] = []  # plain text since the last template special token
        for piece in pieces:
            if piece in contents:
                run.append(contents[piece])
                continue
            start = 0
            for match in self._special.finditer(piece) if self._special else ():
                run.append(piece[start : match.start()])
                ids += self._plain_ids("".join(run))
                ids.append(self._added[match.group()])
                run, start = [], match.end()
            run.append(piece[start:])
        return ids + self._plain_ids("".join(run))

    def _plain_ids(self, text: str) -> list[int]:
        return list(self._plain.encode(text, add_special_tokens=False).ids) if text else []

    def _unmarkable(self, text: str, contents: list[str]) -> list[int]:
        """A template that rewrites content hides where it went: safe only without special text."""
        if self._special is not None and any(self._special.search(c) is not None for c in contents):
            raise InvalidRequestError(
                "A message contains special-token text, which this model's chat template "
                "cannot keep apart from its own tokens.",
                param="messages",
            )
        return self.encode(text, add_special_tokens=False)



class ChatTokensEngine:
    """The tokenizer half of the `Engine` contract, for an engine that holds a `ChatTokenizer`
    (the transformers and vllm engines): one implementation, so both encode alike."""

    _chat_tokens: ChatTokenizer

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._chat_tokens.encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
        add_generation_prompt: bool = True, options: ChatOptions | None = None,
    ) -> tuple[list[int], str]:
        # Special-token text in a message stays text, so a client cannot forge a system turn.
        return self._chat_tokens.encode_conversation(
            messages, tools, add_generation_prompt=add_generation_prompt, options=options
        )

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._chat_tokens.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
        add_generation_prompt: bool = True, options: ChatOptions | None = None,
    ) -> str:
        return self._chat_tokens.render(messages, tools, add_generation_prompt=add_generation_prompt, options=options)
