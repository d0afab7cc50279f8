"""Prompt preparation stays off the event loop, after the concurrency check, and a prompt too long
to possibly fit is refused by its length before it is tokenised."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from chatgate.engines.fake import FakeEngine
from tests.support.app import make_app, raw, running

pytestmark = pytest.mark.anyio

M = "fake-model"
CHAT = "/v1/chat/completions"


class SlowTokenizer(FakeEngine):
    """A fake engine whose tokenizer takes `delay` seconds per call and records its threads."""

    def __init__(self, delay: float = 0.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.delay = delay
        self.encoded: list[int] = []
        self.threads: set[int] = set()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        self.threads.add(threading.get_ident())
        self.encoded.append(len(text))
        time.sleep(self.delay)  # stands in for CPU-bound tokenising
        return super().encode(text, add_special_tokens=add_special_tokens)


async def test_a_prompt_longer_than_any_that_fits_is_refused_untokenised() -> None:
    engine = SlowTokenizer(context_length=1024)
    async with running(make_app(engine)) as app, raw(app) as http:
        # The fake tokenizer's longest token is 3 bytes; the bound is 1024 × 32 characters.
        huge = "x" * (1024 * 32 + 1)
        for path, body, param in [
            (CHAT, {"model": M, "messages": [{"role": "user", "content": huge}]}, "messages"),
            ("/v1/completions", {"model": M, "prompt": huge}, "prompt"),
            ("/v1/embeddings", {"model": M, "input": ["ok", huge]}, "input"),
            ("/api/v1/token_check", {"prompts": [{"model": M, "prompt": huge, "max_tokens": 1}]}, "prompt"),
        ]:
            response = await http.post(path, json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("context_length_exceeded", param)
        assert all(length < 1024 * 32 for length in engine.encoded)
        # Just under the bound, the prompt is tokenised and refused by its token count.
        response = await http.post("/v1/completions", json={"model": M, "prompt": "x" * 2000})
        assert response.json()["error"]["code"] == "context_length_exceeded"
        assert engine.encoded[-1] == 2000


async def test_tokenising_runs_off_the_event_loop_after_the_concurrency_check() -> None:
    engine = SlowTokenizer(delay=0.5, token_delay=0.01)
    app = make_app(engine, limit_worker_concurrency=1)
    async with running(app), raw(app) as http:
        body = {"model": M, "messages": [{"role": "user", "content": "hi"}]}
        first = asyncio.create_task(http.post(CHAT, json=body))
        deadline = time.monotonic() + 10
        while not engine.encoded:  # the first request is tokenising (for 0.5 s)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        # The loop is free: health answers at once, and the second request is refused before
        # it costs a tokenisation, because the first holds the only slot.
        begin = time.perf_counter()
        assert (await http.get("/health")).status_code == 200
        assert time.perf_counter() - begin < 0.25
        assert (await http.post(CHAT, json=body)).status_code == 429
        assert len(engine.encoded) == 1
        assert (await first).status_code == 200
        assert threading.get_ident() not in engine.threads


async def test_a_large_embeddings_response_is_written_in_pieces_and_parses(fake_app: object) -> None:
    from tests.support.app import sdk

    texts = [f"text {i}" for i in range(300)]
    async with raw(fake_app) as http:  # type: ignore[arg-type]
        response = await http.post("/v1/embeddings", json={"model": M, "input": texts})
        assert "content-length" not in response.headers  # written in pieces
        small = (await http.post("/v1/embeddings", json={"model": M, "input": texts[7]})).json()
    body = response.json()
    assert [d["index"] for d in body["data"]] == list(range(300))
    assert body["data"][7]["embedding"] == small["data"][0]["embedding"]
    parsed = await sdk(fake_app).embeddings.create(model=M, input=texts, encoding_format="base64")  # type: ignore[arg-type]
    assert len(parsed.data) == 300 and parsed.usage.prompt_tokens == body["usage"]["prompt_tokens"]
