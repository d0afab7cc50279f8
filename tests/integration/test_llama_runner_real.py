"""The llama.cpp runner's KV handling on the default model's bfloat16 GGUF file: rows copied for
`n` choices decode alike, rows that leave give their sequence ids back, prefix-cache spans resume
a prompt where a full prefill would, and a runner out of sequence ids evicts through `reclaim`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from chatgate.engines.loading import resolve_chat_model
from chatgate.settings import EngineSettings

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")

from chatgate.engines.llamacpp import cached_gguf  # noqa: E402  (needs llama_cpp)
from chatgate.engines.runners.llamacpp import GgufModel, LlamaCppRunner  # noqa: E402

pytestmark = pytest.mark.model

SEQUENCES = 8


@pytest.fixture(scope="module")
def model() -> GgufModel:
    settings = EngineSettings()
    return GgufModel.load(cached_gguf(resolve_chat_model("default"), settings.cache_dir, "bfloat16", threads=1))


@pytest.fixture
def runner(model: GgufModel) -> Iterator[LlamaCppRunner]:
    runner = LlamaCppRunner(model, kv_tokens=1024, sequences=SEQUENCES, threads=1)
    yield runner
    runner.close()


def prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(100, 40000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def free_ids(runner: LlamaCppRunner) -> int:
    return len(runner._free)


def test_copied_rows_decode_alike_and_every_id_comes_back(runner: LlamaCppRunner) -> None:
    kv, logits = runner.prefill([prompt(20)])
    kv.select([0, 0, 0])  # the n = 3 choices of one prompt
    assert kv.rows == 3 and kv.held() == [20, 20, 20] and free_ids(runner) == SEQUENCES - 3
    token = int(logits[0].argmax())
    step = runner.decode(kv, [token] * 3, column_limit=64)
    assert torch.equal(step[0], step[1]) and torch.equal(step[0], step[2])
    kv.select([2])
    assert kv.held() == [21] and free_ids(runner) == SEQUENCES - 1
    kv.select([])
    assert free_ids(runner) == SEQUENCES


def test_a_prompt_resumed_from_prefix_spans_continues_as_a_full_prefill(runner: LlamaCppRunner) -> None:
    ids = prompt(70, seed=1)
    full, expected = runner.prefill_chunk(None, ids)
    spans = full.row_spans(0, [(0, 32), (32, 64)])
    full.select([])
    assert free_ids(runner) == SEQUENCES - 1  # the spans' cache sequence
    resumed = runner.from_prefix(spans, tokens=64, capacity=70)
    resumed, logits = runner.prefill_chunk(resumed, ids[64:])
    assert resumed.held() == [70]
    assert int(logits.argmax()) == int(expected.argmax())
    assert torch.allclose(logits, expected, atol=0.5)  # bfloat16 sums differ with the pass's width
    resumed.select([])
    for span in spans:
        runner.release(span)
    assert free_ids(runner) == SEQUENCES


def test_a_runner_out_of_ids_asks_to_reclaim(runner: LlamaCppRunner) -> None:
    held: list[Any] = []
    kv, _ = runner.prefill([prompt(4, seed=s) for s in range(SEQUENCES - 1)])
    held += kv.row_spans(0, [(0, 4)])  # the last free id
    released: list[Any] = []

    def reclaim() -> bool:
        if not held:
            return False
        released.append(held.pop())
        runner.release(released[-1])
        return True

    runner.reclaim = reclaim
    kv.select([*range(SEQUENCES - 1), 0])  # one row more than ids are free: the span gives its own back
    assert released and kv.rows == SEQUENCES
    with pytest.raises(RuntimeError, match="every sequence id is in use"):
        kv.select([*range(SEQUENCES), 0])
    assert kv.rows == SEQUENCES  # the rows kept are intact
    kv.select([])
    assert free_ids(runner) == SEQUENCES


def test_the_job_context_scores_and_embeds_beside_running_rows(runner: LlamaCppRunner, tmp_path: Path) -> None:
    kv, logits = runner.prefill([prompt(12, seed=3)])
    steps = runner.score_prompt(prompt(12, seed=3), 1)
    try:
        while True:
            next(steps)
    except StopIteration as done:
        scores = done.value
    assert scores[0] is None and len(scores) == 12
    # The running row is untouched: it decodes on as if no job had run.
    after = runner.decode(kv, [int(logits[0].argmax())], column_limit=64)
    assert after.shape == (1, runner.model.vocab_size)
    kv.select([])
