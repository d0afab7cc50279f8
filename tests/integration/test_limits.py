"""Per-key limits from `--api-keys-file`: 429 `rate_limit_exceeded` naming the limit with
`Retry-After`, OpenAI's `x-ratelimit-*` headers, model scoping (404, no leak), and counters in
memory or in a real Redis shared by two API replicas."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI

from chatgate.engines.fake import FakeEngine
from tests.support.app import make_app, raw, running, sdk
from tests.support.polling import apoll
from tests.support.redis_server import RedisServer, free_port

pytestmark = pytest.mark.anyio

M = "fake-model"
MSG: Any = [{"role": "user", "content": "hi"}]
KEYS = {
    "sk-rpm": {"name": "two-a-minute", "rpm": 2},
    "sk-tpm": {"name": "few-tokens", "tpm": 20},
    "sk-par": {"max_parallel_requests": 1},
    "sk-scoped": {"name": "scoped", "models": ["other-model"]},
    "sk-free": None,
}


def keys_file(tmp_path: Path, keys: dict[str, Any] = KEYS, suffix: str = ".yaml") -> Path:
    path = tmp_path / f"keys{suffix}"
    path.write_text(json.dumps(keys))  # JSON is YAML too
    return path


@contextlib.asynccontextmanager
async def limited_app(tmp_path: Path, *engines: FakeEngine, **settings: Any) -> AsyncIterator[FastAPI]:
    async with running(make_app(*(engines or (FakeEngine(),)), api_keys_file=keys_file(tmp_path), **settings)) as app:
        yield app


async def chat(app: FastAPI, key: str, **extra: Any) -> Any:
    async with raw(app) as http:
        return await http.post("/v1/chat/completions", json={"model": M, "messages": MSG, "max_tokens": 5, **extra},
                               headers={"Authorization": f"Bearer {key}"})


async def test_rpm_refuses_with_429_headers_and_retry_after(tmp_path: Path) -> None:
    async with limited_app(tmp_path) as app:
        first, second, third = [await chat(app, "sk-rpm") for _ in range(3)]
        assert first.status_code == second.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert second.headers["x-ratelimit-remaining-requests"] == "0"
        assert first.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in first.headers  # no tpm on this key
        assert third.status_code == 429
        error = third.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "requests per minute" in error["message"]
        assert "two-a-minute" in error["message"] and "sk-rpm" not in error["message"]
        assert 1 <= int(third.headers["retry-after"]) <= 60 and third.headers["x-request-id"]
        with pytest.raises(openai.RateLimitError):
            await sdk(app, api_key="sk-rpm").chat.completions.create(model=M, messages=MSG)
        # Other keys are counted apart; a key without limits gets no headers.
        free = await chat(app, "sk-free")
        assert free.status_code == 200 and "x-ratelimit-limit-requests" not in free.headers


async def test_tpm_counts_prompt_and_completion_tokens(tmp_path: Path) -> None:
    async with limited_app(tmp_path) as app:
        first = await chat(app, "sk-tpm")
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "20"
        used = first.json()["usage"]["total_tokens"]
        assert used >= 20  # one request uses up the budget
        second = await chat(app, "sk-tpm", stream=True)
        assert second.status_code == 429 and "tokens per minute" in second.json()["error"]["message"]
        assert second.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_embedding_tokens_count_against_tpm(tmp_path: Path) -> None:
    async with limited_app(tmp_path) as app, raw(app) as http:
        headers = {"Authorization": "Bearer sk-tpm"}
        first = await http.post("/v1/embeddings", json={"model": M, "input": "x" * 25}, headers=headers)
        assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] >= 20, first.text
        second = await http.post("/v1/embeddings", json={"model": M, "input": "hi"}, headers=headers)
        assert second.status_code == 429 and "tokens per minute" in second.json()["error"]["message"]
        assert (await chat(app, "sk-tpm")).status_code == 429  # one budget for every endpoint


async def test_parallel_requests_limit_frees_its_slot_when_the_stream_ends(tmp_path: Path) -> None:
    slow = FakeEngine(token_delay=0.05)
    async with limited_app(tmp_path, slow) as app:
        client = sdk(app, api_key="sk-par")
        first = asyncio.create_task(chat(app, "sk-par", stream=True, max_tokens=20))
        await apoll(lambda: slow.active > 0, what="the first request holds the key's only slot", timeout=10)
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model=M, messages=MSG, max_tokens=2)
        assert "parallel requests" in err.value.message
        assert (await first).status_code == 200
        again = await client.chat.completions.create(model=M, messages=MSG, max_tokens=2)
        assert again.choices[0].finish_reason


async def test_a_model_the_key_may_not_use_is_not_found(tmp_path: Path) -> None:
    async with limited_app(tmp_path, FakeEngine(), FakeEngine(name="other-model")) as app:
        scoped = sdk(app, api_key="sk-scoped")
        with pytest.raises(openai.NotFoundError) as err:
            await scoped.chat.completions.create(model=M, messages=MSG)
        assert err.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            await scoped.models.retrieve(M)
        assert [m.id async for m in scoped.models.list()] == ["other-model"]
        r = await scoped.chat.completions.create(model="other-model", messages=MSG, max_tokens=2)
        assert r.choices[0].finish_reason
        assert {m.id async for m in sdk(app, api_key="sk-free").models.list()} == {M, "other-model"}


async def test_keys_file_keys_and_plain_keys_are_both_accepted(tmp_path: Path) -> None:
    async with limited_app(tmp_path, api_keys=["sk-plain"]) as app:
        assert (await chat(app, "sk-plain")).status_code == 200
        assert (await chat(app, "sk-free")).status_code == 200
        bad = await chat(app, "sk-nope")
        assert bad.status_code == 401 and "x-ratelimit-limit-requests" not in bad.headers


def test_bad_keys_files_are_refused_at_start(tmp_path: Path) -> None:
    for content in ({"sk-x": {"rpm": 0}}, {"sk-x": {"rpm": "lots"}}, {"sk-x": {"burst": 3}}, ["sk-x"]):
        with pytest.raises(ValueError):
            make_app(FakeEngine(), api_keys_file=keys_file(tmp_path, content, ".json"))  # type: ignore[arg-type]
    (tmp_path / "k.yaml").write_text("sk-a: {rpm: [")
    with pytest.raises(ValueError):
        make_app(FakeEngine(), api_keys_file=tmp_path / "k.yaml")
    (tmp_path / "k.yaml").write_text("sk-a:\n  name: a\n  rpm: 5\nsk-b:\n")
    make_app(FakeEngine(), api_keys_file=tmp_path / "k.yaml")


# Redis -------------------------------------------------------------------------------------

async def test_two_replicas_share_one_keys_rpm_in_redis(tmp_path: Path, redis_url: str) -> None:
    keys = keys_file(tmp_path, {"sk-shared": {"name": "shared", "rpm": 5, "tpm": 100000}})
    async with contextlib.AsyncExitStack() as stack:
        replicas = [await stack.enter_async_context(running(make_app(FakeEngine(), api_keys_file=keys, redis_url=redis_url)))
                    for _ in range(2)]
        results = await asyncio.gather(*(chat(replicas[i % 2], "sk-shared") for i in range(12)))
        statuses = [r.status_code for r in results]
        assert statuses.count(200) == 5 and statuses.count(429) == 7, statuses
        refused = [r for r in results if r.status_code == 429]
        assert all(r.json()["error"]["code"] == "rate_limit_exceeded" and r.headers["retry-after"] for r in refused)
        admitted = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in results if r.status_code == 200)
        assert admitted == [0, 1, 2, 3, 4]  # one window across both replicas
        # Tokens charged on one replica show on the other.
        tokens = sum(r.json()["usage"]["total_tokens"] for r in results if r.status_code == 200)
        later = await chat(replicas[1], "sk-shared")
        assert later.status_code == 429 and int(later.headers["x-ratelimit-remaining-tokens"]) == 100000 - tokens


async def test_redis_down_is_503_not_500(tmp_path: Path) -> None:
    keys = keys_file(tmp_path, {"sk-x": {"rpm": 5}})
    async with running(make_app(FakeEngine(), api_keys_file=keys, redis_url=f"redis://127.0.0.1:{free_port()}/0")) as app:
        r = await chat(app, "sk-x")
        assert r.status_code == 503 and r.json()["error"]["message"].startswith("The rate-limit store is unavailable")
        assert "127.0.0.1" not in r.text  # Redis's address stays in the log


async def test_a_redis_blip_as_a_request_ends_does_not_lock_its_key_out(tmp_path: Path, redis_server: RedisServer) -> None:
    keys = keys_file(tmp_path, {"sk-par": {"name": "one-at-a-time", "max_parallel_requests": 1}})
    slow = FakeEngine(token_delay=0.05)
    async with running(make_app(slow, api_keys_file=keys, redis_url=redis_server.url)) as app:
        first = asyncio.create_task(chat(app, "sk-par", stream=True, max_tokens=20))
        await apoll(lambda: slow.active > 0, what="the request holds the key's only slot", timeout=10)
        redis_server.stop()  # the request ends while Redis is unreachable: its release fails
        assert (await first).status_code == 200
        down = await chat(app, "sk-par")
        assert down.status_code == 503, down.text  # a limited key is refused while Redis is down
        assert str(redis_server.port) not in down.text and "127.0.0.1" not in down.text
        redis_server.start()  # back, with the data it had (the lost slot included)

        async def admitted() -> bool:
            return bool((await chat(app, "sk-par")).status_code == 200)

        await apoll(admitted, what="the key's slot back once Redis is", timeout=15)
