"""Embeddings from the real default models through the openai SDK: all-MiniLM-L6-v2 served with
sentence-transformers, and the chat model's own mean-pooled hidden states."""

from __future__ import annotations

import base64
import math
from collections.abc import AsyncIterator

import numpy as np
import openai
import pytest
from fastapi import FastAPI

from chatgate.engines.sentence_transformers import SentenceTransformersEngine
from chatgate.engines.base import Engine
from chatgate.settings import EngineSettings
from tests.support.app import make_app, running, sdk

pytestmark = [pytest.mark.anyio, pytest.mark.model]

MINILM = "all-MiniLM-L6-v2"
CHAT = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def engines(chat_engine: Engine) -> tuple[SentenceTransformersEngine, Engine]:
    """MiniLM, and the chat model on each runner."""
    return SentenceTransformersEngine(EngineSettings(engine="sentence-transformers")), chat_engine


@pytest.fixture
async def app(engines: tuple[SentenceTransformersEngine, Engine]) -> AsyncIterator[FastAPI]:
    async with running(make_app(*engines)) as app:
        yield app


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def test_minilm_vectors(app: FastAPI, engines: tuple[SentenceTransformersEngine, Engine]) -> None:
    client = sdk(app)
    assert MINILM in [m.id for m in (await client.models.list()).data]
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    response = await client.embeddings.create(model=MINILM, input=texts)
    vectors = [d.embedding for d in response.data]
    assert all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    # Same numbers as sentence-transformers' own encode.
    reference = engines[0]._model.encode(texts, normalize_embeddings=True)
    assert np.allclose(np.array(vectors), reference, atol=1e-5)
    # Usage counts the tokens the model's tokenizer makes, [CLS] and [SEP] included.
    assert response.usage.prompt_tokens == sum(len(engines[0]._tokenizer(t)["input_ids"]) for t in texts)
    b64 = await client.embeddings.create(model=MINILM, input=texts, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(str(d.embedding)), dtype="<f4") for d in b64.data]
    assert np.array_equal(np.array(decoded), np.array(vectors, dtype=np.float32))


async def test_token_id_input_matches_text(app: FastAPI, engines: tuple[SentenceTransformersEngine, Engine]) -> None:
    client = sdk(app)
    ids = engines[0]._tokenizer("hello world")["input_ids"]
    by_ids = await client.embeddings.create(model=MINILM, input=[ids])
    by_text = await client.embeddings.create(model=MINILM, input="hello world")
    assert np.allclose(by_ids.data[0].embedding, by_text.data[0].embedding, atol=1e-6)


async def test_2048_inputs_and_overlong_input(app: FastAPI) -> None:
    client = sdk(app)
    response = await client.embeddings.create(model=MINILM, input=[f"sentence number {i}" for i in range(2048)])
    assert len(response.data) == 2048 and [d.index for d in response.data] == list(range(2048))
    with pytest.raises(openai.BadRequestError) as err:
        await client.embeddings.create(model=MINILM, input=["fine", "word " * 300])
    assert "Input 1 is" in err.value.message and "maximum of 256 tokens" in err.value.message


async def test_chat_model_embeddings(app: FastAPI) -> None:
    client = sdk(app)
    response = await client.embeddings.create(model=CHAT, input=["The cat sat on the mat.", "A cat is sitting on a mat.", "Quarterly revenue grew."])
    vectors = [d.embedding for d in response.data]
    assert all(len(v) == 576 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    # Batched inputs give the vectors they get alone (padding does not leak in).
    alone = await client.embeddings.create(model=CHAT, input="Quarterly revenue grew.")
    assert np.allclose(alone.data[0].embedding, vectors[2], atol=1e-4)


async def test_embedding_model_does_not_chat(app: FastAPI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await sdk(app).chat.completions.create(model=MINILM, messages=[{"role": "user", "content": "hi"}])
    assert err.value.param == "model"
