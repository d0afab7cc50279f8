"""The running batch's KV cache: one padded row per sequence, in preallocated buffers.

Rows are aligned on the right: every row's latest token sits in the same cache column, and a
row that holds fewer tokens has padding on its left, masked out of attention. Appending a
token writes into spare capacity instead of copying the cache (which `DynamicCache` does every
step); rows join and leave between steps; padding that every row shares is cut away, so the
work wasted on padding stays bounded by the longest live sequence, not by history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

_HEADROOM = 64


class _BufferLayer(DynamicLayer):  # type: ignore[misc]  # transformers is not analysed (pyproject.toml)
    """One layer's keys and values: `[rows, heads, capacity, head_dim]`, valid up to `length`."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.column_limit: int | None = None  # never grow past this many columns (when set)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def set_buffers(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        """Adopt buffers already holding `length` valid columns."""
        self._k, self._v, self.length = k, v, length
        self.is_initialized = True
        self.dtype, self.device = k.dtype, k.device
        self._publish()

    def _publish(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        width = key_states.shape[-2]
        if self._k is None or self._v is None:
            rows, heads, _, dim = key_states.shape
            shape = (rows, heads, width + _HEADROOM, dim)
            self.set_buffers(key_states.new_zeros(shape), value_states.new_zeros(shape), 0)
        assert self._k is not None and self._v is not None
        if self.length + width > self._k.shape[2]:
            self._grow(self.length + width)
        self._k[:, :, self.length : self.length + width] = key_states
        self._v[:, :, self.length : self.length + width] = value_states
        self.length += width
        self._publish()
        return self._k[:, :, : self.length], self._v[:, :, : self.length]

    def _grow(self, needed: int) -> None:
        assert self._k is not None and self._v is not None
        capacity = max(needed + _HEADROOM, self._k.shape[2] * 2)
        if self.column_limit is not None:  # doubling past what any row can reach only wastes memory
            capacity = max(needed, min(capacity, self.column_limit))
        rows, heads, _, dim = self._k.shape
        k = self._k.new_zeros((rows, heads, capacity, dim))
        v = self._v.new_zeros((rows, heads, capacity, dim))
        k[:, :, : self.length] = self._k[:, :, : self.length]
        v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def get_seq_length(self) -> int:
        return self.length

    def valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the valid columns."""
        assert self._k is not None and self._v is not None
        return self._k[:, :, : self.length], self._v[:, :, : self.length]


class BatchKV:
    """A KV cache over rows of different lengths, and the left padding of each row."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [_BufferLayer() for _ in range(num_layers)]
        self.cache = Cache(layers=self.layers)
        self.pads: list[int] = []

    @property
    def rows(self) -> int:
        """Number of rows."""
        return len(self.pads)

    @property
    def length(self) -> int:
        """Columns in use: the longest row's length."""
        return self.layers[0].length

    def held(self) -> list[int]:
        """Tokens each row holds (the longest row's length less its padding)."""
        return [self.length - pad for pad in self.pads]

    def limit_columns(self, limit: int) -> None:
        """Grow no further than `limit` columns: the most any row will hold."""
        for layer in self.layers:
            layer.column_limit = limit

    def attention_mask(self, width: int) -> torch.Tensor:
        """2-D mask over cached plus `width` new columns; padding is 0."""
        mask = torch.ones((self.rows, self.length + width), dtype=torch.long)
        for row, pad in enumerate(self.pads):
            mask[row, :pad] = 0
        return mask

    def positions(self, width: int) -> torch.Tensor:
        """Each row's own token positions for the next `width` tokens."""
        start = torch.tensor([self.length - pad for pad in self.pads]).unsqueeze(1)
        # Padding columns of a fresh left-padded prompt get position 0; they are masked anyway.
        return (start + torch.arange(width).unsqueeze(0)).clamp(min=0)

    def extend(self, other: BatchKV) -> None:
        """Add `other`'s rows below these, aligning both on the right."""
        if not self.rows:
            self.layers, self.cache, self.pads = other.layers, other.cache, list(other.pads)
            return
        length = max(self.length, other.length)
        grow_self, grow_other = length - self.length, length - other.length
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            k1, v1 = mine.valid()
            k2, v2 = theirs.valid()
            k = _stack_right_aligned([k1, k2], length)
            v = _stack_right_aligned([v1, v2], length)
            mine.set_buffers(k, v, length)
        self.pads = [p + grow_self for p in self.pads] + [p + grow_other for p in other.pads]

    @classmethod
    def from_prefix(cls, blocks: list[torch.Tensor], *, tokens: int, capacity: int) -> BatchKV:
        """A one-row cache holding the first `tokens` tokens of `blocks` (each `[layers, 2, heads,
        block tokens, dim]`, in order), with room for `capacity` columns so the rest of the
        prompt is written in place. Every layer's buffers are views of one tensor, filled a block
        at a time: no intermediate copy of the whole prefix."""
        layers, _, heads, _, dim = blocks[0].shape
        whole = blocks[0].new_empty((layers, 2, 1, heads, max(capacity, tokens), dim))
        start = 0
        for block in blocks:
            width = min(block.shape[3], tokens - start)
            whole[:, :, 0, :, start : start + width] = block[:, :, :, :width]
            start += width
        out = cls(layers)
        out.pads = [0]
        for index, layer in enumerate(out.layers):
            layer.set_buffers(whole[index, 0], whole[index, 1], tokens)
        return out

    def row_span(self, row: int, start: int, end: int) -> torch.Tensor:
        """A copy of tokens `start:end` of `row` (counted from its first real token), every
        layer's keys and values stacked as `[layers, 2, heads, end - start, dim]`."""
        first = self.pads[row] + start
        parts = []
        for layer in self.layers:
            k, v = layer.valid()
            parts += [k[row, :, first : first + end - start], v[row, :, first : first + end - start]]
        stacked = torch.stack(parts)
        return stacked.view(len(self.layers), 2, *stacked.shape[1:])

    def row_spans(self, row: int, ranges: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """`row_span` of each `(start, end)` of `ranges`."""
        return [self.row_span(row, start, end) for start, end in ranges]

    def select(self, rows: list[int]) -> None:
        """Keep only `rows`, in that order (a row may repeat), then cut shared padding."""
        if rows == list(range(self.rows)) and min(self.pads, default=0) == 0:
            return  # nothing to drop or cut: copying would only cost memory and time
        index = torch.tensor(rows, dtype=torch.long)
        self.pads = [self.pads[r] for r in rows]
        cut = min(self.pads, default=0)
        for layer in self.layers:
            if layer._k is None or layer._v is None:
                continue
            k = layer._k.index_select(0, index)[:, :, cut:]
            v = layer._v.index_select(0, index)[:, :, cut:]
            layer.set_buffers(k.contiguous(), v.contiguous(), layer.length - cut)
        self.pads = [p - cut for p in self.pads]


def _stack_right_aligned(parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """Concatenate `[rows, heads, cols, dim]` tensors on rows, left-padding each to `length` columns."""
    rows = sum(p.shape[0] for p in parts)
    _, heads, _, dim = parts[0].shape
    out = parts[0].new_zeros((rows, heads, length + _HEADROOM, dim))
    row = 0
    for part in parts:
        cols = part.shape[2]
        out[row : row + part.shape[0], :, length - cols : length] = part
        row += part.shape[0]
    return out
