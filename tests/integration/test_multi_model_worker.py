"""One `chatgate worker` serving several models (`--model`, repeatable), on the fake engine:
each worker route goes to the model its body names, the status and heartbeat carry every name,
/metrics is per model, one model unloads while the others keep streaming, LoRA adapters join the
base `base_model_name` names, and a missing, unknown or ill-typed model is a clear error."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from chatgate.engines.fake import FakeEngine
from chatgate.errors import InvalidRequestError, ModelNotFoundError
from chatgate.settings import WorkerSettings
from chatgate.worker.app import create_worker_app
from chatgate.worker.served import ServedModels
from tests.support.app import Messages, make_app, raw, running, sdk
from tests.support.fake_lora import LoraFakeEngine
from tests.support.fleet import fleet_of
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio

MSG: Messages = [{"role": "user", "content": "hi"}]
GEN = {"prompt": "hello", "max_new_tokens": 4, "temperature": 0}


def two_models(**settings: Any) -> FastAPI:
    """A worker serving `a` (also named `alpha`, slow) and `b` (fast), each on a fake engine of its own."""
    return create_worker_app(WorkerSettings(
        no_register=True, engine="fake",
        model=["a model-names=a,alpha fake-token-delay=0.05", "b model-names=b"], **settings,
    ))


def models_of(app: FastAPI) -> ServedModels:
    served: ServedModels = app.state.models
    return served


def served(app: FastAPI) -> list[int]:
    return [backend.served for backend in models_of(app).backends()]


async def post(app: FastAPI, path: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    async with raw(app) as http:
        return await http.post(path, json=body, headers=headers or {})


async def stream_text(app: FastAPI, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """A /worker_generate_stream, read whole: the text (deltas) and every frame."""
    frames = []
    async with raw(app) as http, http.stream("POST", "/worker_generate_stream", json={**body, "delta": True}) as response:
        assert response.status_code == 200
        data = b"".join([chunk async for chunk in response.aiter_bytes()])
    frames = [json.loads(part) for part in data.split(b"\0") if part]
    return "".join(frame["text"] for frame in frames), frames


async def test_each_model_gets_its_own_engine_and_the_status_lists_every_name() -> None:
    app = two_models()
    async with running(app):
        backends = models_of(app).backends()
        assert len(backends) == 2 and backends[0].queue is not backends[1].queue
        status = (await post(app, "/worker_get_status", {})).json()
        assert status["model_names"] == ["a", "alpha", "b"] and status["queue_length"] == 0
        # A slow stream of `a` holds its queue; the status sums the queues.
        slow = asyncio.create_task(post(app, "/worker_generate", {**GEN, "model": "a", "max_new_tokens": 12}))
        await apoll(lambda: models_of(app).load()[0] == 1, what="a's request is in flight", timeout=5)
        assert (await post(app, "/worker_get_status", {})).json()["queue_length"] == 1
        assert (await slow).json()["error_code"] == 0
        ready = (await raw(app).get("/ready")).json()
        assert ready["models"] == ["a", "alpha", "b"]


async def test_every_route_goes_to_the_model_its_body_names() -> None:
    app = two_models()
    async with running(app):
        for model in ("a", "alpha", "b", "b"):
            answer = (await post(app, "/worker_generate", {**GEN, "model": model})).json()
            assert answer["error_code"] == 0 and answer["text"]
        assert served(app) == [2, 2]
        text, frames = await stream_text(app, {**GEN, "model": "b"})
        assert text and frames[-1]["finish_reason"] and served(app) == [2, 3]
        await post(app, "/worker_get_embeddings", {"model": "alpha", "input": ["x"]})
        assert served(app) == [3, 3]
        for model in ("a", "b"):
            count = (await post(app, "/count_token", {"model": model, "prompt": "hello"})).json()
            assert count == {"count": 5, "error_code": 0}
            details = (await post(app, "/model_details", {"model": model})).json()
            assert details["context_length"] == 1024 and "keepalive" in details["chatgate_extensions"]
            conv = (await post(app, "/worker_get_conv_template", {"model": model})).json()
            assert "conv" in conv
            tokens = (await post(app, "/tokenize", {"model": model, "prompt": "hi"})).json()
            assert tokens["tokens"] == [104, 105]
            text_back = (await post(app, "/detokenize", {"model": model, "tokens": tokens["tokens"]})).json()
            assert text_back == {"prompt": "hi"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/worker_generate", GEN),
        ("/worker_get_embeddings", {"input": ["x"]}),
        ("/count_token", {"prompt": "x"}),
        ("/model_details", {}),
        ("/worker_get_conv_template", {}),
        ("/tokenize", {"prompt": "x"}),
        ("/detokenize", {"tokens": [104]}),
    ],
)
async def test_with_several_models_a_missing_or_unknown_model_is_refused(path: str, body: dict[str, Any]) -> None:
    app = two_models()
    async with running(app):
        missing = await post(app, path, body)
        assert missing.status_code == 200  # FastChat's worker shape: the error in the body
        assert missing.json()["error_code"] == InvalidRequestError.fastchat_code
        assert missing.json()["param"] == "model" and "a, alpha, b" in missing.json()["text"]
        unknown = await post(app, path, {**body, "model": "nope"})
        assert unknown.json()["error_code"] == ModelNotFoundError.fastchat_code and "`nope`" in unknown.json()["text"]
        for bad in (5, ["a"], {"a": 1}):
            wrong = await post(app, path, {**body, "model": bad})
            assert wrong.status_code == 400, (bad, wrong.text)
            assert "model" in wrong.json()["error"]["message"]
        assert served(app) == [0, 0]


async def test_with_several_models_a_stream_for_no_model_is_one_error_frame() -> None:
    app = two_models()
    async with running(app):
        text, frames = await stream_text(app, GEN)
        assert len(frames) == 1 and frames[0]["error_code"] == InvalidRequestError.fastchat_code
        text, frames = await stream_text(app, {**GEN, "model": "nope"})
        assert len(frames) == 1 and frames[0]["error_code"] == ModelNotFoundError.fastchat_code


async def test_one_model_answers_without_a_model_name_as_a_fastchat_worker_does() -> None:
    app = create_worker_app(WorkerSettings(no_register=True, engine="fake"), engine=FakeEngine())
    async with running(app):
        async with raw(app) as http:
            details = await http.post("/model_details")  # FastChat's API server once sent no body
        assert details.status_code == 200 and details.json()["context_length"] == 1024
        assert (await post(app, "/count_token", {"prompt": "hey"})).json() == {"count": 3, "error_code": 0}
        assert (await post(app, "/worker_generate", GEN)).json()["error_code"] == 0


async def test_metrics_are_per_model() -> None:
    app = two_models()
    async with running(app):
        await post(app, "/worker_generate", {**GEN, "model": "a"})
        for _ in range(2):
            await post(app, "/worker_generate", {**GEN, "model": "b"})
        text = (await raw(app).get("/metrics")).text
    assert 'chatgate_worker_requests_total{model="a"} 1.0' in text
    assert 'chatgate_worker_requests_total{model="b"} 2.0' in text
    assert 'chatgate_queue_wait_seconds_count{model="a"} 1.0' in text
    assert 'chatgate_queue_wait_seconds_count{model="b"} 2.0' in text
    assert 'chatgate_workers{model="alpha"} 1.0' in text and 'chatgate_workers{model="b"} 1.0' in text


async def test_unloading_one_model_lets_its_stream_finish_and_the_other_keep_streaming() -> None:
    app = create_worker_app(WorkerSettings(
        no_register=True, engine="fake",
        model=["a model-names=a fake-token-delay=0.01", "b model-names=b fake-token-delay=0.08"],
    ))
    async with running(app):  # b's reply (some 50 tokens) takes some 4 s, a's half a second
        long = {**GEN, "prompt": "a longer prompt, for a longer echo", "max_new_tokens": 60}
        running_a = asyncio.create_task(stream_text(app, {**long, "model": "a"}))
        running_b = asyncio.create_task(stream_text(app, {**long, "model": "b"}))
        await apoll(lambda: models_of(app).load()[0] == 2, what="both streams run", timeout=5)
        unloaded = await post(app, "/v1/models/unload", {"model": "a"})  # waits for a's stream
        assert unloaded.status_code == 200, unloaded.text
        a, b = models_of(app).backends()
        assert a.load()[0] == 0 and b.load()[0] == 1 and not running_b.done()  # a's finished; b still streams
        assert models_of(app).model_names == ["b"]
        refused = (await post(app, "/worker_generate", {**GEN, "model": "a"})).json()
        assert refused["error_code"] == ModelNotFoundError.fastchat_code
        assert (await post(app, "/v1/models/load", {"model": "a"})).status_code == 200
        text_a, frames_a = await running_a
        text_b, frames_b = await running_b
        assert frames_a[-1]["error_code"] == 0 and frames_b[-1]["error_code"] == 0
        assert text_a == text_b and frames_b[-1]["finish_reason"]  # same fake model, same answer
        assert models_of(app).model_names == ["a", "b"]
        assert (await post(app, "/v1/models/unload", {"model": "nobody"})).status_code == 404


async def test_a_fleet_serves_each_model_of_one_worker_and_learns_an_unload_at_the_next_heartbeat() -> None:
    worker = two_models()
    async with fleet_of(worker) as (api, beat, pool):
        client = sdk(api)
        assert sorted([m.id async for m in client.models.list()]) == ["a", "alpha", "b"]
        for model in ("a", "b"):
            answer = await client.chat.completions.create(model=model, messages=MSG, temperature=0)
            assert "Echo" in (answer.choices[0].message.content or "")
            stream = await client.completions.create(model=model, prompt="hello", max_tokens=4, stream=True)
            assert "".join([c.choices[0].text async for c in stream if c.choices])
            count = await raw(api).post("/v1/embeddings", json={"model": model, "input": "x"})
            assert count.status_code == 200
        assert served(worker) == [3, 3]
        assert (await post(worker, "/v1/models/unload", {"model": "a"})).status_code == 200
        await beat.beat()
        await pool.refresh()
        assert [m.id async for m in client.models.list()] == ["b"]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="a", messages=MSG)
        assert (await client.chat.completions.create(model="b", messages=MSG)).choices[0].message.content


def lora_worker(**settings: Any) -> FastAPI:
    """Two models that take adapters (`a`, `b`) and one that does not (`plain`)."""
    engines = [LoraFakeEngine(name="a"), LoraFakeEngine(name="b"), FakeEngine(name="plain")]
    return create_worker_app(WorkerSettings(no_register=True, engine="fake", **settings), engines=list(engines))


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"lora_name": "x", "lora_path": "/adapters/x"}, 400, "base_model_name"),  # several take adapters
        ({"lora_name": "x", "lora_path": "/adapters/x", "base_model_name": "nope"}, 404, "base_model_name"),
        ({"lora_name": "x", "lora_path": "/adapters/x", "base_model_name": "plain"}, 400, "base_model_name"),
        ({"lora_name": "b", "lora_path": "/adapters/x", "base_model_name": "a"}, 400, "lora_name"),  # taken
        ({"lora_name": "x", "lora_path": "/adapters/x", "base_model_name": 5}, 400, None),
        ({"lora_name": "x", "lora_path": "/adapters/x", "base_model_name": ""}, 400, None),
        ({"lora_name": "x", "lora_path": "/adapters/x", "base_model_name": "m" * 300}, 400, None),
    ],
)
async def test_a_worker_refuses_an_adapter_without_a_base_it_can_take(body: dict[str, Any], status: int, param: str | None) -> None:
    app = lora_worker()
    async with running(app):
        refused = await post(app, "/v1/load_lora_adapter", body)
        assert refused.status_code == status, refused.text
        error = refused.json()["error"]
        if param is not None:
            assert error["param"] == param
        else:
            assert "base_model_name" in error["message"]
        assert models_of(app).model_names == ["a", "b", "plain"]


async def test_a_worker_loads_an_adapter_beside_the_base_it_names() -> None:
    app = lora_worker(fleet_key="fleet-secret")
    key = {"Authorization": "Bearer fleet-secret"}
    async with running(app):
        body = {"lora_name": "tuned", "lora_path": "/adapters/tuned", "base_model_name": "b"}
        assert (await post(app, "/v1/load_lora_adapter", body)).status_code == 401  # no fleet key
        loaded = await post(app, "/v1/load_lora_adapter", body, key)
        assert loaded.status_code == 200, loaded.text
        engines = [backend.engine for backend in models_of(app).backends()]  # type: ignore[attr-defined]
        assert [getattr(e, "loaded", None) for e in engines] == [{}, {"tuned": "/adapters/tuned"}, None]
        status = (await post(app, "/worker_get_status", {}, key)).json()
        assert status["model_names"] == ["a", "b", "tuned", "plain"]
        assert (await post(app, "/worker_generate", {**GEN, "model": "tuned"}, key)).json()["error_code"] == 0
        assert served(app) == [0, 1, 0]  # the adapter's request ran on its base's engine
        again = await post(app, "/v1/load_lora_adapter", {**body, "base_model_name": "a"}, key)
        assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
        assert (await post(app, "/v1/unload_lora_adapter", {"lora_name": "tuned"}, key)).status_code == 200
        assert (await post(app, "/v1/unload_lora_adapter", {"lora_name": "tuned"}, key)).status_code == 404
        assert models_of(app).model_names == ["a", "b", "plain"]


ADMIN, USER = "sk-admin", "sk-user"


async def test_serve_picks_an_adapters_base_the_same_way_behind_the_admin_key() -> None:
    app = make_app(LoraFakeEngine(name="a"), LoraFakeEngine(name="b"), FakeEngine(name="plain"),
                   api_keys=[USER], admin_keys=[ADMIN])
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with running(app):
        body = {"lora_name": "tuned", "lora_path": "/adapters/tuned"}
        user = await post(app, "/v1/load_lora_adapter", {**body, "base_model_name": "a"}, {"Authorization": f"Bearer {USER}"})
        assert user.status_code == 403
        several = await post(app, "/v1/load_lora_adapter", body, admin)
        assert several.status_code == 400 and several.json()["error"]["param"] == "base_model_name"
        plain = await post(app, "/v1/load_lora_adapter", {**body, "base_model_name": "plain"}, admin)
        assert plain.status_code == 400 and plain.json()["error"]["param"] == "base_model_name"
        unknown = await post(app, "/v1/load_lora_adapter", {**body, "base_model_name": "nope"}, admin)
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "base_model_name"
        assert (await post(app, "/v1/load_lora_adapter", {**body, "base_model_name": "a"}, admin)).status_code == 200
        client = sdk(app, USER)
        assert sorted([m.id async for m in client.models.list()]) == ["a", "b", "plain", "tuned"]
        assert (await client.completions.create(model="tuned", prompt="hi", max_tokens=3)).choices[0].text


async def test_with_one_model_that_takes_adapters_the_base_may_be_left_out() -> None:
    lora = LoraFakeEngine(name="a")
    app = make_app(lora, FakeEngine(name="plain"))
    async with running(app):
        loaded = await post(app, "/v1/load_lora_adapter", {"lora_name": "tuned", "lora_path": "/adapters/tuned"})
        assert loaded.status_code == 200, loaded.text
        assert lora.loaded == {"tuned": "/adapters/tuned"}


async def test_the_api_server_keeps_each_models_details_apart_on_one_worker() -> None:
    """Two models of one worker with different context lengths: what the API server learned
    about one (asked first) does not size requests for the other."""
    worker = create_worker_app(
        WorkerSettings(no_register=True, engine="fake"),
        engines=[FakeEngine(name="roomy", context_length=4096), FakeEngine(name="tight", context_length=64)],
    )
    async with fleet_of(worker) as (api, _beat, pool):
        client = sdk(api)
        prompt = "x" * 100  # 100 tokens on the fake engine: fits 4,096, not 64
        roomy = await client.completions.create(model="roomy", prompt=prompt, max_tokens=4)
        assert roomy.usage is not None and roomy.usage.prompt_tokens == 100
        with pytest.raises(openai.BadRequestError) as refused:
            await client.completions.create(model="tight", prompt=prompt, max_tokens=4)
        assert "64" in str(refused.value)
        learned = {model: details.context_length for (_, model), details in pool._facts.details.items()}
        assert learned == {"roomy": 4096, "tight": 64}
        async with raw(api) as http:
            models = (await http.get("/v1/models")).json()["data"]
        assert sorted(m["id"] for m in models) == ["roomy", "tight"]
