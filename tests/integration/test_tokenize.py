"""vLLM's `/tokenize` and `/detokenize`: counts equal what generation takes, on the fake model,
the real one and over the worker protocol; bad input, keys and FastChat workers get 4xx."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI

from chatgate.engines.fake import BOS, FakeEngine
from tests.support.app import Target, make_app, raw, running, sdk
from tests.support.fastchat import NoExtensions
from tests.support.fleet import fleet, worker_app
from tests.support.runners import Served

pytestmark = pytest.mark.anyio

M = "fake-model"
MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo"}]


async def post(app: Target, path: str, body: Any, key: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with raw(app) as http:
        r = await http.post(path, json=body, headers=headers)
    return r.status_code, r.json()


async def test_prompt_and_messages_count_what_generation_takes(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    status, tok = await post(fake_app, "/tokenize", {"model": M, "prompt": "héllo wörld"})
    done = await client.completions.create(model=M, prompt="héllo wörld", max_tokens=1)
    assert status == 200 and tok["count"] == len(tok["tokens"]) == done.usage.prompt_tokens  # type: ignore[union-attr]
    assert tok["max_model_len"] == 1024 and tok.get("token_strs") is None
    status, tok = await post(fake_app, "/tokenize", {"model": M, "messages": MSG})
    chat = await client.chat.completions.create(model=M, messages=MSG, max_tokens=1)  # type: ignore[arg-type]
    assert status == 200 and tok["count"] == chat.usage.prompt_tokens  # type: ignore[union-attr]
    _, bare = await post(fake_app, "/tokenize", {"model": M, "messages": MSG, "add_generation_prompt": False})
    assert bare["count"] < tok["count"] and tok["tokens"][: bare["count"]] == bare["tokens"]


async def test_token_strs_and_round_trip(fake_app: FastAPI) -> None:
    _, tok = await post(fake_app, "/tokenize", {"model": M, "prompt": "abc", "return_token_strs": True})
    assert tok["tokens"] == [97, 98, 99] and tok["token_strs"] == ["a", "b", "c"]
    status, back = await post(fake_app, "/detokenize", {"model": M, "tokens": tok["tokens"]})
    assert status == 200 and back == {"prompt": "abc"}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"model": M}, None),
        ("/tokenize", {"model": M, "prompt": "x", "messages": MSG}, None),
        ("/tokenize", {"model": M, "prompt": 5}, "prompt"),
        ("/tokenize", {"model": M, "messages": []}, "messages"),
        ("/tokenize", {"model": M, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("/tokenize", {"model": M, "prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
        ("/tokenize", {"prompt": "x"}, "model"),
        ("/detokenize", {"model": M, "tokens": [-1]}, "tokens[0]"),
        ("/detokenize", {"model": M, "tokens": [BOS + 1]}, "tokens"),
        ("/detokenize", {"model": M, "tokens": [1.5]}, "tokens[0]"),
        ("/detokenize", {"model": M, "tokens": [10**30]}, "tokens"),
        ("/detokenize", {"model": M, "tokens": "abc"}, "tokens"),
        ("/detokenize", [1, 2], None),
    ],
)
async def test_bad_input_is_400(fake_app: FastAPI, path: str, body: Any, param: str | None) -> None:
    status, err = await post(fake_app, path, body)
    assert status == 400, err
    assert err["error"]["type"] == "invalid_request_error"
    if param is not None:
        assert err["error"]["param"] == param


async def test_unknown_model_is_404(fake_app: FastAPI) -> None:
    status, err = await post(fake_app, "/tokenize", {"model": "nope", "prompt": "x"})
    assert status == 404 and err["error"]["code"] == "model_not_found"
    status, err = await post(fake_app, "/detokenize", {"model": "nope", "tokens": [1]})
    assert status == 404 and err["error"]["code"] == "model_not_found"


async def test_behind_the_api_key() -> None:
    async with running(make_app(FakeEngine(), api_keys=["sk-good"])) as app:
        for path, body in (("/tokenize", {"model": M, "prompt": "x"}), ("/detokenize", {"model": M, "tokens": [97]})):
            status, err = await post(app, path, body)
            assert status == 401 and err["error"]["code"] == "invalid_api_key"
            assert (await post(app, path, body, key="sk-bad"))[0] == 401
            assert (await post(app, path, body, key="sk-good"))[0] == 200


async def test_over_the_worker_protocol_and_a_fastchat_worker() -> None:
    async with fleet("shortest_queue", {"http://w1": worker_app()}) as f:
        status, tok = await post(f.api, "/tokenize", {"model": M, "messages": MSG, "return_token_strs": True})
        chat = await sdk(f.api).chat.completions.create(model=M, messages=MSG, max_tokens=1)  # type: ignore[arg-type]
        assert status == 200 and tok["count"] == chat.usage.prompt_tokens and len(tok["token_strs"]) == tok["count"]  # type: ignore[union-attr]
        status, back = await post(f.api, "/detokenize", {"model": M, "tokens": [104, 105]})
        assert status == 200 and back == {"prompt": "hi"}
        status, err = await post(f.api, "/detokenize", {"model": M, "tokens": [BOS + 5]})
        assert status == 400 and err["error"]["param"] == "tokens"
    fastchat = worker_app()
    fastchat.add_middleware(NoExtensions)
    async with fleet("shortest_queue", {"http://fc": fastchat}) as f:
        for path, body in (("/tokenize", {"model": M, "prompt": "x"}), ("/detokenize", {"model": M, "tokens": [97]})):
            status, err = await post(f.api, path, body)
            assert status == 400 and "not supported by this worker" in err["error"]["message"], err


@pytest.mark.model
async def test_real_model_counts_what_chat_and_completions_take(served: Served) -> None:
    model = "SmolLM2-135M-Instruct"
    client, chat_app = sdk(served.api), served.api
    _, tok = await post(chat_app, "/tokenize", {"model": model, "messages": MSG, "return_token_strs": True})
    chat = await client.chat.completions.create(model=model, messages=MSG, max_tokens=1)  # type: ignore[arg-type]
    assert tok["count"] == chat.usage.prompt_tokens and tok["max_model_len"] >= 2048  # type: ignore[union-attr]
    assert tok["token_strs"][0] == "<|im_start|>"
    _, back = await post(chat_app, "/detokenize", {"model": model, "tokens": tok["tokens"]})
    assert back["prompt"].startswith("<|im_start|>system\nBe brief.") and back["prompt"].endswith("<|im_start|>assistant\n")
    _, tok = await post(chat_app, "/tokenize", {"model": model, "prompt": "The capital of France is"})
    done = await client.completions.create(model=model, prompt="The capital of France is", max_tokens=1)
    assert tok["count"] == done.usage.prompt_tokens  # type: ignore[union-attr]
