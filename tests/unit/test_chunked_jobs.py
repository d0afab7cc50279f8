"""Prompt scoring and chat-model embeddings run in chunks, between decode steps, with the same
results as one pass."""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Iterator

import pytest
import torch
from transformers import LlamaForCausalLM

from chatgate.engines import chunked
from chatgate.engines.base import SamplingParams
from chatgate.engines.embedding import mean_pool
from chatgate.engines.scheduler import Scheduler, SchedulerLimits
from chatgate.engines.sequence import OutputChannel, Sequence
from tests.support.scheduler import VOCAB, scheduler_thread, tiny_model

pytestmark = pytest.mark.anyio
LONG = chunked.CHUNK_TOKENS * 3 + 17


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def finish(steps: Generator[None, None, object]) -> tuple[object, int]:
    """Run a chunked job to its end; its result and the number of chunks it took."""
    chunks = 0
    while True:
        try:
            next(steps)
            chunks += 1
        except StopIteration as done:
            return done.value, chunks


def test_scoring_in_windows_equals_one_pass(model: LlamaForCausalLM) -> None:
    prompt = ids(LONG)
    scored, chunks = finish(chunked.score_prompt(model, prompt, top=2))
    assert chunks == 4
    with torch.inference_mode():
        full = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert isinstance(scored, list) and scored[0] is None and len(scored) == len(prompt)
    for i, entry in enumerate(scored[1:]):
        assert entry.token_id == prompt[i + 1]
        assert entry.logprob == pytest.approx(float(full[i, prompt[i + 1]]), abs=1e-3)


def test_embedding_long_and_short_inputs_in_chunks_equals_one_pass(model: LlamaForCausalLM) -> None:
    inputs = [ids(LONG, 1), ids(5, 2), ids(40, 3), ids(chunked.CHUNK_TOKENS, 4)]
    vectors, chunks = finish(chunked.embed(model, inputs, pad_id=0, device="cpu"))
    assert chunks >= 5  # the long input alone takes four windows
    with torch.inference_mode():
        for got, tokens in zip(vectors, inputs, strict=True):  # type: ignore[call-overload]
            mask = torch.ones(1, len(tokens), dtype=torch.long)
            hidden = model.base_model(input_ids=torch.tensor([tokens]), attention_mask=mask).last_hidden_state
            want = torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)[0]
            assert torch.allclose(torch.tensor(got), want, atol=1e-4)


@pytest.fixture
def scheduler(model: LlamaForCausalLM) -> Iterator[Scheduler]:
    with scheduler_thread(model, SchedulerLimits(max_running=4)) as s:
        yield s


async def test_a_long_job_never_holds_decoding_for_more_than_one_chunk(
    scheduler: Scheduler, model: LlamaForCausalLM
) -> None:
    events: list[str] = []  # appended from the scheduler thread only

    def job() -> Iterator[None]:
        for _ in chunked.score_prompt(model, ids(LONG * 2), top=0):
            events.append("chunk")
            yield

    def decode(tokens: object) -> str:
        events.append("token")
        return "x"

    channel = OutputChannel(asyncio.get_running_loop())
    scheduler.inbox.put(Sequence(prompt_ids=ids(6), params=SamplingParams(max_tokens=40, temperature=0.0),
                                 decode=decode, eos_token_ids=frozenset(), channel=channel))
    await asyncio.wait_for(channel.get(), timeout=60)  # the stream is decoding
    scheduler.inbox.put(job())
    while (await asyncio.wait_for(channel.get(), timeout=60)).finish_reason is None:
        pass
    first, last = events.index("chunk"), len(events) - events[::-1].index("chunk")
    during = events[first:last]
    assert during.count("chunk") == -(-LONG * 2 // chunked.CHUNK_TOKENS)
    assert "chunk,chunk" not in ",".join(during)  # a decode step between every two chunks
