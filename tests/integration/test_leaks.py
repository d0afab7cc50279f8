"""Nothing of the operator's reaches a client: an `openai` upstream's URL (with its
`user:password@`), the operator's key or its masked suffix, and the transport's own words stay
in the server's log; an upstream refusing the operator's credentials is a 502, not the client's
401."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from chatgate.api.app import create_api_app
from chatgate.settings import ServeSettings
from tests.support.app import raw, running
from tests.support.fake_upstream import API_KEY, URL, sse_response, upstream_pool

pytestmark = pytest.mark.anyio

M = "fake-model"
CHAT = {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
SECRETS = ["hunter2-secret", "operator:", "upstream.internal", "8001", "wxyz", API_KEY]


def app_over(handler: Callable[[httpx.Request], httpx.Response]) -> FastAPI:
    return create_api_app(ServeSettings(), upstream_pool(handler))


def error_json(status: int, message: str, code: str | None = None) -> Callable[[httpx.Request], httpx.Response]:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return lambda request: httpx.Response(status, json=body)


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, (secret, text)


async def post(app: FastAPI, path: str = "/v1/chat/completions", **extra: Any) -> httpx.Response:
    async with running(app), raw(app) as http:
        return await http.post(path, json={**CHAT, **extra})


OPENAI_401 = f"Incorrect API key provided: sk-opera************************wxyz. You can find your API key at {URL}."


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_refusing_the_operators_key_is_a_502_with_nothing_of_it(
    status: int, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        response = await post(app_over(error_json(status, OPENAI_401, "invalid_api_key")), stream=stream)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert error["code"] != "invalid_api_key" and "credentials" in error["message"]
    assert_clean(response.text)
    assert f"HTTP {status}" in caplog.text  # the operator learns what happened
    assert "hunter2-secret" not in caplog.text and API_KEY not in caplog.text


async def test_an_unreachable_upstream_is_a_503_that_names_nothing() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"connection refused by {request.url} ({URL})", request=request)

    response = await post(app_over(refuse))
    assert response.status_code == 503 and response.json()["error"]["code"] == "service_unavailable"
    assert_clean(response.text)
    embeddings = await post(app_over(refuse), "/v1/embeddings", input="hi")
    assert embeddings.status_code == 503
    assert_clean(embeddings.text)


async def test_an_upstream_5xx_is_a_503_that_names_nothing() -> None:
    response = await post(app_over(error_json(500, f"proxy error talking to {URL} with key {API_KEY}")))
    assert response.status_code == 503
    assert_clean(response.text)


async def test_a_4xx_reaches_the_client_scrubbed_of_the_operators_secrets() -> None:
    response = await post(app_over(error_json(400, f"max_tokens is too large for {URL}; key sk-opera...wxyz")))
    assert response.status_code == 400 and "max_tokens is too large" in response.json()["error"]["message"]
    assert_clean(response.text)


async def test_a_stream_broken_mid_way_names_nothing() -> None:
    def breaks(request: httpx.Request) -> httpx.Response:
        async def body() -> Any:
            event = {"choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}]}
            yield f"data: {json.dumps(event)}\n\n".encode()
            raise httpx.ReadError(f"connection to {URL} reset")

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    response = await post(app_over(breaks), stream=True)
    assert response.status_code == 200 and "partial" in response.text and '"error"' in response.text
    assert_clean(response.text)


async def test_an_error_event_from_the_upstream_names_nothing() -> None:
    events: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]},
              {"error": {"message": f"engine at {URL} died", "type": "server_error", "code": 500}}]
    response = await post(app_over(lambda request: sse_response(events)), stream=True)
    assert '"error"' in response.text
    assert_clean(response.text)
