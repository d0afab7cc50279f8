"""The embeddings API on the fake engine: shapes, encodings, limits and batching."""

from __future__ import annotations

import asyncio
import base64
import struct

import openai
import pytest
from fastapi import FastAPI

from chatgate.engines.fake import EMBEDDING_DIM, FakeEngine
from tests.support.app import make_app, raw, running, sdk

pytestmark = pytest.mark.anyio

M = "fake-model"


async def test_inputs_of_every_form(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    single = await client.embeddings.create(model=M, input="hello")
    assert len(single.data) == 1 and len(single.data[0].embedding) == EMBEDDING_DIM
    assert single.usage.prompt_tokens == 5 and single.usage.total_tokens == 5
    many = await client.embeddings.create(model=M, input=["a", "hello", "a"])
    assert [d.index for d in many.data] == [0, 1, 2]
    assert many.data[0].embedding == many.data[2].embedding != many.data[1].embedding
    assert many.data[1].embedding == single.data[0].embedding
    assert many.usage.prompt_tokens == 7
    ids = await client.embeddings.create(model=M, input=list(b"hello"))
    assert ids.data[0].embedding == single.data[0].embedding
    id_lists = await client.embeddings.create(model=M, input=[list(b"a"), list(b"hello")])
    assert [d.embedding for d in id_lists.data] == [many.data[0].embedding, many.data[1].embedding]


async def test_vectors_are_normalised_and_base64_matches(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    floats = (await client.embeddings.create(model=M, input=["x y z"])).data[0].embedding
    assert abs(sum(v * v for v in floats) - 1.0) < 1e-5
    async with raw(fake_app) as http:
        body = (await http.post("/v1/embeddings", json={"model": M, "input": ["x y z"], "encoding_format": "base64"})).json()
    packed = base64.b64decode(body["data"][0]["embedding"])
    assert list(struct.unpack(f"<{EMBEDDING_DIM}f", packed)) == pytest.approx(floats, abs=1e-7)
    sdk_b64 = await client.embeddings.create(model=M, input=["x y z"], encoding_format="base64")
    decoded = struct.unpack(f"<{EMBEDDING_DIM}f", base64.b64decode(str(sdk_b64.data[0].embedding)))
    assert list(decoded) == pytest.approx(floats, abs=1e-7)


async def test_engines_path_and_dimensions(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        r = await http.post(f"/v1/engines/{M}/embeddings", json={"input": "hi"})
        assert r.status_code == 200 and r.json()["model"] == M
        ok = await http.post("/v1/embeddings", json={"model": M, "input": "hi", "dimensions": EMBEDDING_DIM})
        assert ok.status_code == 200
        bad = await http.post("/v1/embeddings", json={"model": M, "input": "hi", "dimensions": 8})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "dimensions"


LIMITS = [
    ("empty string", {"input": ""}, "input"),
    ("empty list", {"input": []}, "input"),
    ("empty string in list", {"input": ["a", ""]}, "input[1]"),
    ("too many inputs", {"input": ["a"] * 2049}, "input"),
    ("wrong type", {"input": 5}, "input"),
    ("mixed list", {"input": [1, "a"]}, "input[0]"),
    ("object", {"input": {"text": "a"}}, "input"),
    ("bad format", {"input": "a", "encoding_format": "hex"}, "encoding_format"),
    ("no model", {"input": "a", "model": ""}, "model"),
    ("token out of vocab", {"input": [1, 100000]}, "input"),
]


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in LIMITS], ids=[c[0] for c in LIMITS])
async def test_bad_inputs_get_400(fake_app: FastAPI, body: dict[str, object], param: str) -> None:
    async with raw(fake_app) as http:
        r = await http.post("/v1/embeddings", json={"model": M, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_overlong_input_is_named(fake_app: FastAPI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await sdk(fake_app).embeddings.create(model=M, input=["short", "x" * 1500])
    assert "Input 1 is 1500 tokens long" in err.value.message
    assert err.value.param == "input"


async def test_2048_inputs_succeed(fake_app: FastAPI) -> None:
    response = await sdk(fake_app).embeddings.create(model=M, input=[f"sentence {i}" for i in range(2048)])
    assert [d.index for d in response.data] == list(range(2048))


async def test_concurrent_requests_share_batches() -> None:
    engine = FakeEngine(token_delay=0.02)
    async with running(make_app(engine)) as app:
        client = sdk(app)
        results = await asyncio.gather(*(client.embeddings.create(model=M, input=f"text {i}") for i in range(24)))
    assert all(len(r.data) == 1 for r in results)
    assert sum(engine.embed_calls) == 24
    assert len(engine.embed_calls) < 24 / 2, engine.embed_calls
