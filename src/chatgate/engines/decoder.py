"""A Llama-family forward pass laid out for decoding a few rows at a time.

Hugging Face's module-per-op forward spends a decode step in many small calls and in
`F.linear`, whose few-row shapes land on slow BLAS paths on CPU. This forward reads the same
parameters laid out for decoding instead:
- the Q, K and V projections are one matrix, as are the gate and up projections, stored
  pre-transposed and contiguous, so each is one `x @ Wt` (the fast path for few rows);
- the Hugging Face model's linear weights become views into those matrices, so scoring and
  embedding (which still run the Hugging Face forward) share the memory instead of doubling it;
- grouped-query attention folds the query heads that share a key/value head into extra query
  rows, so the cache is attended as stored, without repeating keys and values per head;
- the final norm and the vocabulary projection run on the last position only.

LoRA adapters (`lora.py`) are added per row: each fused projection adds `(x A) B` of the
adapter a row's sequence uses, to that row only, so the base model's rows and several
adapters' rows share a step; the base weights are never changed.

It writes and reads the same `BatchKV` cache as the Hugging Face forward. `FastDecoder.supports`
says which models it can run; the engine keeps the Hugging Face forward for any other.
Nothing here assumes a device: tensors stay wherever the model's parameters are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from chatgate.engines.lora import LoraAdapter
from chatgate.engines.projections import Projection, fuse, vocabulary

# Which adapted linears each fused projection holds, side by side in this order.
_FUSED = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
# Per layer, per fused projection: (rows, A [in, R], B [R, out]) of each adapter in the step.
_Deltas = list[dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]]


@dataclass(frozen=True)
class DecoderOutput:
    """What the scheduler reads from a forward pass (as from a Hugging Face model output)."""

    logits: torch.Tensor


@dataclass(frozen=True)
class _Layer:
    attn_norm: torch.Tensor
    qkv: Projection  # hidden -> (heads + 2 * kv_heads) * head_dim
    o: Projection
    mlp_norm: torch.Tensor
    gate_up: Projection  # hidden -> 2 * intermediate
    down: Projection


class FastDecoder:
    """The forward pass of a Llama-family causal LM over a `BatchKV` cache."""

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether `model` is a plain Llama-style decoder this forward reproduces exactly."""
        config = getattr(model, "config", None)
        rope = getattr(config, "rope_parameters", None) or {}
        return (
            getattr(config, "model_type", None) in {"llama", "mistral"}
            and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False)
            and getattr(config, "hidden_act", None) == "silu"
            and rope.get("rope_type", "default") == "default"
            and getattr(config, "sliding_window", None) is None
        )

    def __init__(self, model: Any, *, weight_format: str = "float32") -> None:
        if not self.supports(model):
            raise ValueError(f"FastDecoder cannot run {type(model).__name__}")
        self.config = model.config
        self.device: torch.device = model.device
        inner = model.model
        self._heads = int(self.config.num_attention_heads)
        self._kv_heads = int(self.config.num_key_value_heads)
        self._head_dim = int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self._heads)
        self._eps = float(self.config.rms_norm_eps)
        self._embed = inner.embed_tokens.weight.detach()
        self._rotary = inner.rotary_emb
        self._final_norm = inner.norm.weight.detach()
        self._format = weight_format
        self._lm_head = vocabulary(model.lm_head.weight, weight_format)
        self._layers = [self._layer(block) for block in inner.layers]
        hidden, dim = int(self.config.hidden_size), self._head_dim
        inter = int(self.config.intermediate_size)
        self._widths = {"q_proj": self._heads * dim, "k_proj": self._kv_heads * dim, "v_proj": self._kv_heads * dim,
                        "o_proj": hidden, "gate_proj": inter, "up_proj": inter, "down_proj": hidden}
        # Adapter name -> per layer, per fused projection, `(A, B)` with B spread over the fused columns.
        self._adapters: dict[str, list[dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}

    def _layer(self, block: Any) -> _Layer:
        attn, mlp = block.self_attn, block.mlp
        return _Layer(
            attn_norm=block.input_layernorm.weight.detach(),
            qkv=fuse([attn.q_proj, attn.k_proj, attn.v_proj], self._format),
            o=fuse([attn.o_proj], self._format),
            mlp_norm=block.post_attention_layernorm.weight.detach(),
            gate_up=fuse([mlp.gate_proj, mlp.up_proj], self._format),
            down=fuse([mlp.down_proj], self._format),
        )

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Serve `adapter` to rows that name it (any thread: one dict assignment)."""
        fused: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for deltas in adapter.layers:
            layer: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for key, targets in _FUSED.items():
                pair = self._fused_delta(targets, deltas)
                if pair is not None:
                    layer[key] = pair
            fused.append(layer)
        self._adapters[adapter.name] = fused

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter `name` (no running row may still name it)."""
        self._adapters.pop(name, None)

    def _fused_delta(
        self, targets: tuple[str, ...], deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One `(A, B)` for a fused projection: the targets' A side by side, and their B placed
        block-diagonally in the fused output columns, so the delta is two products."""
        present = [t for t in targets if t in deltas]
        if not present:
            return None
        a = torch.cat([deltas[t][0] for t in present], dim=1)
        b = a.new_zeros((a.shape[1], sum(self._widths[t] for t in targets)))
        row = column = 0
        for target in targets:
            if target in deltas:
                rank = deltas[target][0].shape[1]
                b[row : row + rank, column : column + self._widths[target]] = deltas[target][1]
                row += rank
            column += self._widths[target]
        return a, b

    def _deltas(self, lora: list[str | None] | None) -> _Deltas | None:
        """Each layer's LoRA work for this step, grouped by adapter (None: no row uses one)."""
        if not lora or all(name is None for name in lora):
            return None
        groups: dict[str, tuple[list[int], list[dict[str, tuple[torch.Tensor, torch.Tensor]]]]] = {}
        for row, name in enumerate(lora):
            # An adapter removed while this step was planned served a request that has ended
            # (an unload waits for every running one): its row runs as the base model, unread.
            served = self._adapters.get(name) if name is not None else None
            if name is not None and served is not None:
                groups.setdefault(name, ([], served))[0].append(row)
        if not groups:
            return None
        per_layer: _Deltas = [{} for _ in self._layers]
        for members, fused_layers in groups.values():
            index = torch.tensor(members, device=self.device)
            for layer, fused in zip(per_layer, fused_layers, strict=True):
                for key, (a, b) in fused.items():
                    layer.setdefault(key, []).append((index, a, b))
        return per_layer

    def __call__(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Any,
        use_cache: bool = True,
        logits_to_keep: int = 1,
        lora: list[str | None] | None = None,
    ) -> DecoderOutput:
        """Run `input_ids` ([rows, width]) on top of the cache; logits of the last `logits_to_keep`
        positions. `lora` names each row's adapter (None: the base model)."""
        hidden = F.embedding(input_ids, self._embed)
        cos, sin = self._rotary(hidden, position_ids)
        mask = _attention_mask(attention_mask.bool(), input_ids.shape[1], groups=self._heads // self._kv_heads)
        deltas = self._deltas(lora)
        for index, layer in enumerate(self._layers):
            project = _projector(deltas[index] if deltas is not None else None)
            hidden = self._block(layer, past_key_values.layers[index], hidden, cos, sin, mask, project)
        last = _rms_norm(hidden[:, -logits_to_keep:], self._final_norm, self._eps)
        return DecoderOutput(logits=self._lm_head(last))

    def _block(
        self, layer: _Layer, cache: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
        project: _Project,
    ) -> torch.Tensor:
        rows, width, _ = hidden.shape
        heads, kv_heads, dim = self._heads, self._kv_heads, self._head_dim
        qkv = project("qkv", layer.qkv, _rms_norm(hidden, layer.attn_norm, self._eps)).view(rows, width, heads + 2 * kv_heads, dim)
        # Rotate queries and keys together: one pass over the heads that need it.
        qk = _rotate(qkv[:, :, : heads + kv_heads], cos.unsqueeze(2), sin.unsqueeze(2))
        q = qk[:, :, :heads]
        k = qk[:, :, heads:].transpose(1, 2)
        v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
        keys, values = cache.update(k, v)
        groups = heads // kv_heads
        # Query heads sharing a key/value head become extra query rows of that head.
        q = q.reshape(rows, width, kv_heads, groups, dim).permute(0, 2, 3, 1, 4).reshape(rows, kv_heads, groups * width, dim)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        attended = attended.view(rows, kv_heads, groups, width, dim).permute(0, 3, 1, 2, 4).reshape(rows, width, heads * dim)
        hidden = hidden + project("o", layer.o, attended)
        gate, up = project("gate_up", layer.gate_up, _rms_norm(hidden, layer.mlp_norm, self._eps)).chunk(2, dim=-1)
        return hidden + project("down", layer.down, F.silu(gate) * up)


class _Project(Protocol):
    def __call__(self, key: str, projection: Projection, x: torch.Tensor) -> torch.Tensor: ...


def _projector(deltas: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] | None) -> _Project:
    """Apply a projection, plus each adapter's delta on the rows that use it."""
    if deltas is None:
        return lambda key, projection, x: projection(x)

    def project(key: str, projection: Projection, x: torch.Tensor) -> torch.Tensor:
        y = projection(x)
        for rows, a, b in deltas.get(key, ()):
            y.index_add_(0, rows, (x.index_select(0, rows) @ a) @ b)
        return y

    return project


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as one fused call (bit-identical to Hugging Face's in float32)."""
    return F.rms_norm(hidden, (hidden.shape[-1],), weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, half-split as Llama's `rotate_half`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _attention_mask(valid: torch.Tensor, width: int, *, groups: int) -> torch.Tensor:
    """Boolean `[rows, 1, groups * width, columns]` mask: causal, no padding keys.

    Every query may see its own column, so a padding query (which nobody reads) still has one
    key and its softmax stays finite instead of spreading NaN through the cache.
    """
    rows, columns = valid.shape
    mask = valid[:, None, None, :].expand(rows, 1, width, columns)
    if width > 1:
        query_columns = torch.arange(columns - width, columns, device=valid.device)[:, None]
        key_columns = torch.arange(columns, device=valid.device)[None, :]
        mask = (mask & (key_columns <= query_columns)) | (key_columns == query_columns)
    # Decode rows share one mask row, which broadcasts; prefill rows repeat per query group.
    return mask.repeat(1, 1, groups, 1) if width > 1 and groups > 1 else mask

