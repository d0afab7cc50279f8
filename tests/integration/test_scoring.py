"""`/v1/rerank` (and `/rerank`, `/v2/rerank`) and `/v1/score` as a bi-encoder: on the fake engine
the scores are the cosine similarities of the vectors `/v1/embeddings` returns, sorted with
stable indices, `top_n` and `return_documents` honoured, usage counted and charged, every bad
field a 400 naming it; on the real all-MiniLM-L6-v2 the related document ranks first."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI

from chatgate.engines.fake import FakeEngine
from chatgate.engines.sentence_transformers import SentenceTransformersEngine
from chatgate.settings import EngineSettings
from tests.support.app import make_app, raw, running, sdk

pytestmark = pytest.mark.anyio

M = "fake-model"
DOCS = ["aaaa", "abab", "zzzz", "aaab", "abab"]


async def vectors(app: FastAPI, texts: list[str], model: str = M) -> np.ndarray:
    """The vectors `/v1/embeddings` gives `texts`, normalised."""
    response = await sdk(app).embeddings.create(model=model, input=texts)
    matrix = np.array([d.embedding for d in response.data])
    unit: np.ndarray = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return unit


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
async def test_rerank_is_cosine_sorted_with_stable_indices(fake_app: FastAPI, path: str) -> None:
    async with raw(fake_app) as http:
        r = await http.post(path, json={"model": M, "query": "aaaa", "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("rerank-") and body["model"] == M
    expected = (await vectors(fake_app, DOCS)) @ (await vectors(fake_app, ["aaaa"]))[0]
    results = body["results"]
    assert [x["index"] for x in results] == sorted(range(len(DOCS)), key=lambda i: -expected[i])
    assert np.allclose([x["relevance_score"] for x in results], sorted(expected, reverse=True))
    assert results[0]["index"] == 0 and results[0]["relevance_score"] == pytest.approx(1.0)
    twins = [x["index"] for x in results if x["index"] in (1, 4)]
    assert twins == [1, 4]  # equal scores keep the order they were given in
    assert [x["document"]["text"] for x in results] == [DOCS[x["index"]] for x in results]
    embedded = await sdk(fake_app).embeddings.create(model=M, input=["aaaa", *DOCS])
    assert body["usage"]["total_tokens"] == embedded.usage.prompt_tokens


async def test_rerank_top_n_documents_as_objects_and_without_documents(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        full = (await http.post("/v1/rerank", json={"model": M, "query": "aaaa", "documents": DOCS})).json()
        top = (await http.post("/v1/rerank", json={"model": M, "query": "aaaa", "documents": [{"text": d} for d in DOCS],
                                                   "top_n": 2, "return_documents": False})).json()
        every = (await http.post("/v1/rerank", json={"model": M, "query": "aaaa", "documents": DOCS, "top_n": 99})).json()
    assert [x["index"] for x in top["results"]] == [x["index"] for x in full["results"][:2]]
    assert all("document" not in x or x["document"] is None for x in top["results"])
    assert len(every["results"]) == len(DOCS)


async def test_score_one_to_one_and_one_to_many(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        many = (await http.post("/v1/score", json={"model": M, "text_1": "aaaa", "text_2": DOCS})).json()
        pairs = (await http.post("/v1/score", json={"model": M, "text_1": ["aaaa", "zzzz"], "text_2": ["abab", "zzzz"]})).json()
        one = (await http.post("/score", json={"model": M, "text_1": ["aaaa"], "text_2": "aaab"})).json()
    expected = (await vectors(fake_app, DOCS)) @ (await vectors(fake_app, ["aaaa"]))[0]
    assert many["object"] == "list" and [d["index"] for d in many["data"]] == list(range(len(DOCS)))
    assert np.allclose([d["score"] for d in many["data"]], expected)
    left, right = await vectors(fake_app, ["aaaa", "zzzz"]), await vectors(fake_app, ["abab", "zzzz"])
    assert np.allclose([d["score"] for d in pairs["data"]], np.sum(left * right, axis=1))
    assert pairs["data"][1]["score"] == pytest.approx(1.0)
    assert [d["score"] for d in one["data"]] == pytest.approx([float(expected[3])])
    assert many["usage"]["prompt_tokens"] == many["usage"]["total_tokens"] > 0


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/rerank", {"documents": []}, "documents"),
    ("/v1/rerank", {"documents": ["ok", ""]}, "documents[1]"),
    ("/v1/rerank", {"documents": ["x"] * 2049}, "documents"),
    ("/v1/rerank", {"documents": "one"}, "documents"),
    ("/v1/rerank", {"documents": [{"text": 5}]}, "documents[0].text"),
    ("/v1/rerank", {"query": ""}, "query"),
    ("/v1/rerank", {"query": None}, "query"),
    ("/v1/rerank", {"top_n": -1}, "top_n"),
    ("/v1/rerank", {"top_n": 1.5}, "top_n"),
    ("/v1/rerank", {"top_n": float("nan")}, "top_n"),
    ("/v1/rerank", {"return_documents": "yes"}, "return_documents"),
    ("/v1/rerank", {"documents": ["\ud800"]}, "documents"),
    ("/v1/rerank", {"model": "x" * 10}, "model"),  # not served: 404
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_2"),
    ("/v1/score", {"text_1": [], "text_2": "a"}, "text_1"),
    ("/v1/score", {"text_2": ["x"] * 2049}, "text_2"),
    ("/v1/score", {"text_1": 5}, "text_1"),
]


@pytest.mark.parametrize(("path", "fields", "param"), BAD)
async def test_bad_requests_are_400_naming_the_field(fake_app: FastAPI, path: str, fields: dict[str, Any], param: str) -> None:
    base = {"model": M, "query": "q", "documents": ["d"]} if "rerank" in path else {"model": M, "text_1": "q", "text_2": ["d"]}
    body = {k: v for k, v in {**base, **fields}.items() if v is not None}
    async with raw(fake_app) as http:
        r = await http.post(path, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    assert r.status_code == (404 if param == "model" else 400), r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/rerank", {"query": "q", "documents": ["ok", "x" * 2000]}, "documents"),
    ("/v1/rerank", {"query": "x" * 2000, "documents": ["ok"]}, "query"),
    ("/v1/score", {"text_1": "q", "text_2": ["ok", "x" * 2000]}, "text_2"),
])
async def test_a_text_longer_than_the_model_reads_is_a_400_naming_its_field(fake_app: FastAPI, path: str, body: dict[str, Any], param: str) -> None:
    async with raw(fake_app) as http:
        r = await http.post(path, json={"model": M, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert r.json()["error"]["code"] == "context_length_exceeded"


async def test_keys_and_tokens_per_minute_apply(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-a": {"name": "small", "tpm": 30}, "sk-b": {}}))
    async with running(make_app(FakeEngine(), api_keys_file=keys)) as app, raw(app) as http:
        body = {"model": M, "query": "q" * 20, "documents": ["d" * 20]}
        assert (await http.post("/v1/rerank", json=body)).status_code == 401
        assert (await http.post("/v1/score", json={"model": M, "text_1": "a", "text_2": "b"}, headers={"x-api-key": "sk-x"})).status_code == 401
        first = await http.post("/v1/rerank", json=body, headers={"authorization": "Bearer sk-a"})
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] >= 30
        second = await http.post("/v1/rerank", json=body, headers={"authorization": "Bearer sk-a"})
        assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
        other = await http.post("/v1/rerank", json=body, headers={"authorization": "Bearer sk-b"})
        assert other.status_code == 200


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformersEngine:
    return SentenceTransformersEngine(EngineSettings(engine="sentence-transformers"))


@pytest.fixture
async def minilm_app(minilm: SentenceTransformersEngine) -> AsyncIterator[FastAPI]:
    async with running(make_app(minilm)) as app:
        yield app


@pytest.mark.model
async def test_minilm_ranks_the_related_document_first(minilm_app: FastAPI, minilm: SentenceTransformersEngine) -> None:
    query = "How do I bake bread at home?"
    documents = [
        "The stock market fell sharply today.",
        "Knead the dough, let it rise, then bake the loaf at 220 degrees.",
        "Cats sleep for most of the day.",
    ]
    async with raw(minilm_app) as http:
        r = await http.post("/v1/rerank", json={"model": "all-MiniLM-L6-v2", "query": query, "documents": documents, "top_n": 1})
        s = await http.post("/v1/score", json={"model": "all-MiniLM-L6-v2", "text_1": query, "text_2": documents})
    assert r.status_code == 200 and s.status_code == 200
    assert r.json()["results"][0]["index"] == 1 and len(r.json()["results"]) == 1
    reference = minilm._model.encode([query, *documents], normalize_embeddings=True)
    assert np.allclose([d["score"] for d in s.json()["data"]], reference[1:] @ reference[0], atol=1e-5)
    assert r.json()["results"][0]["relevance_score"] == pytest.approx(s.json()["data"][1]["score"], abs=1e-6)
