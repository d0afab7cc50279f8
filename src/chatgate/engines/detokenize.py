"""Incremental detokenisation: the text of a growing token list at constant cost per token.

Decoding the whole completion again for every new token costs time linear in its length, so a
long generation slows down quadratically. Decoding only the newest tokens on their own is not
enough either: a token's text can depend on its neighbours (SentencePiece drops the leading
space of the first token it decodes; byte-fallback and byte-level tokens can hold half a UTF-8
character). So each new token decodes a short window that starts one settled token group earlier,
and takes only the text past that context, as `decode(window) - decode(context)`. Text is
settled once it no longer ends in an incomplete character, so the joined pieces equal a full
decode of all tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
# A UTF-8 character has at most 4 bytes and every token adds at least one, so text more than
# this many tokens before the end can no longer change when further tokens arrive.
_CHAR_TOKENS = 4
# Held tokens past which the window is settled up to its last `_CHAR_TOKENS` (junk bytes that
# never form a character would otherwise grow the window without end).
_MAX_HELD = 2 * _CHAR_TOKENS

Decode = Callable[[Sequence[int]], str]


class IncrementalDecoder:
    """Turns tokens, one at a time, into settled text pieces."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._context = 0  # start of the window: tokens decoded again only as context
        self._settled = 0  # tokens whose text has been handed out
        self._context_text = ""  # decode(ids[context:settled])

    def push(self, token_id: int) -> str:
        """Add a token; return the text it settles ('' while a character is incomplete)."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._context :])
        if not text.endswith(REPLACEMENT):
            return self._settle(len(self._ids), text)
        if len(self._ids) - self._settled > _MAX_HELD:
            return self._settle_held(text)
        return ""

    def flush(self) -> str:
        """The text of every token not yet settled, even if it ends in a broken character."""
        if self._settled == len(self._ids):
            return ""
        return self._settle(len(self._ids), self._decode(self._ids[self._context :]))

    def _settle(self, end: int, text: str) -> str:
        """Hand out `text` (the decode of ids[context:end]) past the context."""
        piece = text[len(self._context_text) :]
        self._context, self._settled = self._settled, end
        self._context_text = self._decode(self._ids[self._context : self._settled])
        return piece

    def _settle_held(self, text: str) -> str:
        """Settle all but the last few held tokens, if their text is already final."""
        end = len(self._ids) - _CHAR_TOKENS
        head = self._decode(self._ids[self._context : end])
        if not text.startswith(head):  # the split would cut a character: keep holding
            return ""
        return self._settle(end, head)
