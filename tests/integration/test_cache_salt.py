"""`cache_salt` and API keys decide which requests may share cached prompt prefixes: the salt a
worker's engine receives is the same for the same key and client salt, differs otherwise, carries
neither the key nor the client's salt, and never reaches a FastChat worker. Bad salts get a 400."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatgate.engines.base import GenerationOutput, SamplingParams
from chatgate.engines.fake import FakeEngine
from tests.support.app import make_app, raw, running, sdk, user
from tests.support.fastchat import NoExtensions
from tests.support.fleet import fleet, worker_app

pytestmark = pytest.mark.anyio

M = "fake-model"
KEYS = ["sk-alpha-0123456789", "sk-bravo-0123456789"]


class SaltRecorder(FakeEngine):
    """The fake model, remembering the cache salt of every generation it is asked for."""

    def __init__(self) -> None:
        super().__init__(name=M)
        self.salts: list[str | None] = []

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationOutput]:
        self.salts.append(params.cache_salt)
        return super().generate(prompt_ids, params)


async def chat_salt(app: FastAPI, engine: SaltRecorder, key: str = "sk-test", salt: str | None = None, n: int = 1) -> list[str | None]:
    """The salts the engine saw for one chat request (one per choice)."""
    seen = len(engine.salts)
    extra = {"cache_salt": salt} if salt is not None else None
    await sdk(app, api_key=key).chat.completions.create(model=M, messages=user("hi"), max_tokens=2, n=n, extra_body=extra)
    return engine.salts[seen:]


async def test_each_key_gets_its_own_salt_and_the_same_key_always_the_same() -> None:
    engine = SaltRecorder()
    async with running(make_app(engine, api_keys=KEYS)) as app:
        alpha, bravo = KEYS
        [plain_a] = await chat_salt(app, engine, alpha)
        assert await chat_salt(app, engine, alpha) == [plain_a]
        [plain_b] = await chat_salt(app, engine, bravo)
        [salted_a] = await chat_salt(app, engine, alpha, "team-1")
        [salted_b] = await chat_salt(app, engine, bravo, "team-1")
        assert len({plain_a, plain_b, salted_a, salted_b}) == 4
        assert await chat_salt(app, engine, alpha, "team-1", n=3) == [salted_a] * 3  # choices share their prompt
        seen = len(engine.salts)
        await sdk(app, api_key=alpha).completions.create(model=M, prompt="hi", max_tokens=2)
        await sdk(app, api_key=alpha).responses.create(model=M, input="hi", max_output_tokens=16, extra_body={"cache_salt": "team-1"})
        stream = await sdk(app, api_key=bravo).chat.completions.create(model=M, messages=user("hi"), max_tokens=2, stream=True)
        assert [chunk async for chunk in stream]
        assert engine.salts[seen:] == [plain_a, salted_a, plain_b]
    for salt in (plain_a, plain_b, salted_a, salted_b):
        assert salt is not None and len(salt) == 64 and "alpha" not in salt and "team" not in salt


async def test_api_servers_in_front_of_one_fleet_derive_the_same_salt() -> None:
    """No per-process secret: a tenant's requests share a worker's cache whichever API server they reach."""
    first, second = SaltRecorder(), SaltRecorder()
    async with running(make_app(first, api_keys=KEYS)) as one, running(make_app(second, api_keys=KEYS)) as two:
        assert await chat_salt(one, first, KEYS[0], "s") == await chat_salt(two, second, KEYS[0], "s")
        assert await chat_salt(one, first, KEYS[1]) == await chat_salt(two, second, KEYS[1])


async def test_without_keys_only_the_client_salt_separates() -> None:
    engine = SaltRecorder()
    async with running(make_app(engine)) as app:
        assert await chat_salt(app, engine) == [None]
        [x] = await chat_salt(app, engine, salt="x")
        assert await chat_salt(app, engine, "sk-other", salt="x") == [x]  # no keys: the header is not a tenant
        assert x is not None and await chat_salt(app, engine, salt="y") != [x]


BAD_SALTS: list[Any] = [5, "", "s" * 257, ["a"], {"a": "b"}, True]
ROUTES = [
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2}),
    ("/v1/responses", {"model": M, "input": "hi", "max_output_tokens": 16}),
]


@pytest.mark.parametrize(("path", "body"), ROUTES, ids=[path for path, _ in ROUTES])
async def test_a_bad_cache_salt_is_a_400_naming_it(fake_app: FastAPI, path: str, body: dict[str, Any]) -> None:
    async with raw(fake_app) as http:
        for bad in BAD_SALTS:
            response = await http.post(path, json={**body, "cache_salt": bad})
            assert response.status_code == 400, (bad, response.text)
            error = response.json()["error"]
            assert error["param"] == "cache_salt" and error["type"] == "invalid_request_error", error
        for good in ("s" * 256, "é"):
            assert (await http.post(path, json={**body, "cache_salt": good})).status_code == 200


async def test_the_sdk_sees_a_bad_cache_salt_as_a_bad_request(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    for bad in ("", "s" * 257, 7):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=M, messages=user("hi"), extra_body={"cache_salt": bad})
        assert caught.value.param == "cache_salt"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=M, prompt="hi", extra_body={"cache_salt": bad})
        assert caught.value.param == "cache_salt"
    done = await client.chat.completions.create(model=M, messages=user("hi"), max_tokens=2, extra_body={"cache_salt": "ok"})
    assert done.choices[0].message.content


class BodyTap:
    """Records the JSON body of every `/worker_generate_stream` a worker receives."""

    def __init__(self, app: ASGIApp, *, bodies: list[dict[str, Any]]) -> None:
        self.app = app
        self.bodies = bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/worker_generate_stream":
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []

        async def tapped() -> Message:
            message = await receive()
            if message["type"] == "http.request":  # later, the app listens for a disconnect
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(parts)))
            return message

        await self.app(scope, tapped, send)


async def test_only_chatgate_workers_receive_the_salt() -> None:
    """A FastChat worker gets FastChat's payload; a chatgate worker gets the digest, not the client's salt."""
    for fastchat in (False, True):
        bodies: list[dict[str, Any]] = []
        worker = worker_app()
        worker.add_middleware(BodyTap, bodies=bodies)
        if fastchat:
            worker.add_middleware(NoExtensions)
        async with fleet("shortest_queue", {"http://w": worker}) as f:
            await sdk(f.api).chat.completions.create(model=M, messages=user("hi"), max_tokens=2, extra_body={"cache_salt": "team-1"})
        [body] = bodies
        if fastchat:
            assert "cache_salt" not in body and "messages" not in body, body
        else:
            assert len(body["cache_salt"]) == 64 and "team" not in body["cache_salt"], body
