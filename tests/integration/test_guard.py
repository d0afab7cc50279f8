"""Nobody unauthenticated costs the server anything; what clients send back is kept in bounds."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from chatgate.engines.fake import FakeEngine
from tests.support.app import make_app, raw, running

pytestmark = pytest.mark.anyio

M = "fake-model"
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
KEY = {"Authorization": "Bearer sk-1"}


async def test_a_request_without_a_key_is_refused_before_its_body_is_read() -> None:
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(7 * 1024):  # 7 MB, in 1 KB pieces
            pulled += 1
            yield b" " * 1024

    async with running(make_app(FakeEngine(), api_keys=["sk-1"])) as app, raw(app) as http:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
            pulled = 0
            response = await http.post(CHAT, content=body(), headers={"content-type": "application/json", **headers})
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert pulled <= 1, pulled  # the transport may start one piece; the app never asks
        ok = await http.post(CHAT, json={"model": M, "messages": MSG}, headers=KEY)
        assert ok.status_code == 200


async def test_docs_are_off_by_default_and_behind_the_key_when_on() -> None:
    async with running(make_app(FakeEngine())) as app, raw(app) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await http.get(path)).status_code == 404, path
    async with running(make_app(FakeEngine(), api_keys=["sk-1"], docs=True)) as app, raw(app) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await http.get(path)).status_code == 401, path
            assert (await http.get(path, headers=KEY)).status_code == 200, path
        assert "/v1/chat/completions" in (await http.get("/openapi.json", headers=KEY)).json()["paths"]
        assert (await http.get("/health")).status_code == 200  # probes need no key


@pytest.mark.parametrize(
    "given",
    ["x" * 129, "x" * 8000, "<script>alert(1)</script>", "café", "a b", "a\tb", ""],
)
async def test_an_unacceptable_request_id_is_replaced(fake_app: object, given: str) -> None:
    async with raw(fake_app) as http:  # type: ignore[arg-type]
        headers = {b"x-request-id": given.encode("utf-8")} if given else {}
        response = await http.post(CHAT, json={"model": M, "messages": MSG}, headers=headers)
    returned = response.headers["x-request-id"]
    assert returned != given and returned.startswith("req_") and len(returned) <= 128


async def test_an_acceptable_request_id_is_kept(fake_app: object) -> None:
    given = "Trace-1.2_3:4" + "x" * 115  # 128 characters of the allowed set
    async with raw(fake_app) as http:  # type: ignore[arg-type]
        response = await http.post(CHAT, json={"model": M, "messages": MSG}, headers={"x-request-id": given})
    assert response.headers["x-request-id"] == given


async def test_the_sse_error_event_names_the_header_request_id() -> None:
    async with running(make_app(FakeEngine(fail_after=3))) as app, raw(app) as http:
        for sent in ({"x-request-id": "trace-7"}, {"x-request-id": "<bad id>"}):
            response = await http.post(CHAT, json={"model": M, "messages": MSG, "stream": True}, headers=sent)
            header = response.headers["x-request-id"]
            last = [e for e in response.text.split("\n\n") if e][-1]
            error = json.loads(last.removeprefix("data: "))["error"]
            assert f"request id {header})" in error["message"]
        assert header.startswith("req_")


async def test_metrics_label_only_served_models(fake_app: object) -> None:
    async with raw(fake_app) as http:  # type: ignore[arg-type]
        for i in range(30):
            await http.post(CHAT, json={"model": f"invented-{i}", "messages": MSG})
            await http.post(CHAT, json={"model": f"invented-n-{i}", "messages": MSG, "n": 99})
        await http.post(CHAT, json={"model": M, "messages": MSG})
        metrics = (await http.get("/metrics")).text
    assert "invented" not in metrics
    assert f'model="{M}"' in metrics
