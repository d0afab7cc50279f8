"""The fast decoder against Hugging Face's forward, on a tiny random Llama (no model download)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chatgate.bench.quality import compare, greedy
from chatgate.engines.decoder import FastDecoder, _attention_mask
from chatgate.engines.kvcache import BatchKV
from chatgate.engines import projections
from chatgate.engines.projections import SHORTLIST, Bfloat16, Int8Dynamic, Shortlist


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        initializer_range=0.3,  # far from uniform logits, so different weights pick different tokens
    )
    model = LlamaForCausalLM(config)
    model.train(False)  # what .eval() does; transformers leaves eval() unannotated and untyped for mypy
    return model


def step_logits(model: Callable[..., Any], kv: BatchKV, ids: torch.Tensor) -> torch.Tensor:
    steps = ids.shape[1]
    out = model(
        input_ids=ids, attention_mask=kv.attention_mask(steps), position_ids=kv.positions(steps),
        past_key_values=kv.cache, use_cache=True, logits_to_keep=1,
    )
    logits: torch.Tensor = out.logits[:, -1]
    return logits


@torch.inference_mode()
def test_left_padded_prefill_then_decode_matches_hugging_face() -> None:
    reference = tiny_llama()
    fast = FastDecoder(copy.deepcopy(reference))
    prompts = [[5, 9, 17, 3, 44, 8], [7, 2], [11, 12, 13, 14]]
    width = max(len(p) for p in prompts)
    caches = []
    for _ in range(2):
        kv = BatchKV(2)
        kv.pads = [width - len(p) for p in prompts]
        caches.append(kv)
    ids = torch.zeros((3, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
    theirs, mine = step_logits(reference, caches[0], ids), step_logits(fast, caches[1], ids)
    for _ in range(5):
        assert torch.allclose(mine, theirs, atol=1e-5), (mine - theirs).abs().max()
        ids = theirs.argmax(-1, keepdim=True)
        theirs, mine = step_logits(reference, caches[0], ids), step_logits(fast, caches[1], ids)


def test_hugging_face_linears_share_the_fused_weights() -> None:
    model = tiny_llama()
    before = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    FastDecoder(model)
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.k_proj.weight, before)
    # Views into one transposed matrix: same storage, one column per output feature.
    storages = {p.weight.untyped_storage().data_ptr() for p in (attn.q_proj, attn.k_proj, attn.v_proj)}
    assert len(storages) == 1 and attn.k_proj.weight.stride()[0] == 1


def test_mask_hides_padding_and_future_but_never_a_whole_row() -> None:
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    mask = _attention_mask(valid, 2, groups=1)
    assert mask.shape == (2, 1, 2, 4)
    assert mask[0, 0].tolist() == [[False, False, True, False], [False, False, True, True]]
    assert mask[1, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    padded_query = _attention_mask(torch.tensor([[False, False, False, True]]), 2, groups=1)
    assert padded_query[0, 0, 0].tolist() == [False, False, True, False]  # its own column only
    assert _attention_mask(valid, 2, groups=3).shape == (2, 1, 6, 4)
    assert _attention_mask(valid[:, :3], 1, groups=3).shape == (2, 1, 1, 3)  # decode: broadcast


def test_int8_weights_approximate_the_dense_product() -> None:
    torch.manual_seed(1)
    weight = torch.randn(48, 64) * 0.05
    x = torch.randn(3, 2, 64)
    exact = x @ weight.t()
    approx = Int8Dynamic(weight)(x)
    assert approx.shape == exact.shape
    assert (approx - exact).norm() / exact.norm() < 0.05


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "plain"])
def test_bfloat16_weights_approximate_the_float32_product(onednn: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(projections, "_onednn_bfloat16", lambda: onednn)
    torch.manual_seed(2)
    weight = torch.randn(48, 64) * 0.05
    product = Bfloat16(weight)
    assert (product._packed is not None) == onednn
    for rows in (1, 3, 16):
        x = torch.randn(2, rows, 64)
        exact = x @ weight.t()
        approx = product(x)
        assert approx.dtype == torch.float32 and approx.shape == exact.shape
        error = float((approx - exact).norm() / exact.norm())
        assert 0 < error < 0.01  # rounded (so really bfloat16), but only by bfloat16's few bits


@torch.inference_mode()
def test_shortlist_logits_are_float32_where_they_decide() -> None:
    torch.manual_seed(3)
    weight = torch.randn(500, 64)
    x = torch.randn(4, 2, 64)
    exact = x @ weight.t()
    logits = Shortlist(weight)(x)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    rescored = (logits - exact).abs() < 1e-4
    assert bool((rescored.sum(-1) >= SHORTLIST).all())  # the shortlist (and a few logits bfloat16 hit) is float32's
    best = exact.topk(SHORTLIST // 2, dim=-1).indices  # and it holds the best logits (its edge may differ)
    assert bool(rescored.gather(-1, best).all())
    assert 0 < float((logits - exact)[~rescored].abs().max()) < 0.1  # the rest is bfloat16's


@torch.inference_mode()
def test_bfloat16_format_tracks_float32_greedy_tokens() -> None:
    reference = FastDecoder(tiny_llama())
    prompts = [[5, 9, 17], [7, 2, 40, 41], [11]]
    drift = compare(reference, FastDecoder(tiny_llama(), weight_format="bfloat16"), prompts, tokens=8)
    assert drift["greedy_token_agreement"] >= 0.9
    assert 0 < drift["mean_abs_delta_logprob"] < 0.05


@torch.inference_mode()
def test_quality_gate_is_exact_for_float32_and_sees_int8_drift() -> None:
    reference = FastDecoder(tiny_llama())
    prompts = [[5, 9, 17], [7, 2, 40, 41], [11]]
    same = compare(reference, FastDecoder(tiny_llama()), prompts, tokens=8)
    assert same == {"greedy_token_agreement": 1.0, "mean_abs_delta_logprob": 0.0, "prompts_unchanged": 1.0}
    drift = compare(reference, FastDecoder(tiny_llama(), weight_format="int8"), prompts, tokens=8)
    assert drift["mean_abs_delta_logprob"] > 0
    other = compare(reference, FastDecoder(tiny_llama(seed=5)), prompts, tokens=8)
    assert other["greedy_token_agreement"] < 1.0 and other["prompts_unchanged"] < 1.0
    assert len(greedy(reference, prompts, 4)) == 3


def test_unsupported_models_are_refused() -> None:
    model = tiny_llama()
    model.config.hidden_act = "gelu"
    assert not FastDecoder.supports(model)
    with pytest.raises(ValueError):
        FastDecoder(model)
