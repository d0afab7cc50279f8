"""`x-request-timeout`: a client's cap on its whole request. Past it, a response not yet started is
a 504 and a flowing stream ends with that error; the generation stops and is charged."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from chatgate.engines.fake import FakeEngine
from tests.support.app import make_app, raw, running, sdk
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio

ASK: Any = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}


async def test_a_held_response_past_its_deadline_is_a_504_and_the_engine_stops() -> None:
    engine = FakeEngine(token_delay=0.05)  # 200 tokens: 10 s
    async with running(make_app(engine)) as app:
        begin = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk(app).chat.completions.create(**ASK, extra_headers={"x-request-timeout": "0.5"})
        assert caught.value.status_code == 504
        assert caught.value.body["code"] == "request_timeout"  # type: ignore[index]
        assert time.monotonic() - begin < 5  # well under the 10 s the generation would take
        await apoll(lambda: engine.active == 0, what="the generation stopped", timeout=5)
        # A request within its deadline is not touched by it.
        quick = await sdk(app).chat.completions.create(**{**ASK, "max_tokens": 3}, extra_headers={"x-request-timeout": "30"})
        assert quick.choices[0].finish_reason == "length"


async def test_a_stream_past_its_deadline_ends_with_the_error_as_its_last_event() -> None:
    engine = FakeEngine(token_delay=0.05)
    async with running(make_app(engine)) as app, raw(app) as http:
        async with http.stream("POST", "/v1/chat/completions", json={**ASK, "stream": True},
                               headers={"x-request-timeout": "0.6"}) as response:
            assert response.status_code == 200
            events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert 1 < len(events) < 100
    last = json.loads(events[-1])
    assert last["error"]["code"] == "request_timeout" and "0.6 seconds" in last["error"]["message"]
    assert "[DONE]" not in events
    await apoll(lambda: engine.active == 0, what="the generation stopped", timeout=5)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e9", "soon", ""])
async def test_bad_values_are_a_400_naming_the_header(value: str) -> None:
    async with running(make_app(FakeEngine())) as app, raw(app) as http:
        response = await http.post("/v1/chat/completions", json=ASK, headers={"x-request-timeout": value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "x-request-timeout"


async def test_the_header_twice_is_a_400() -> None:
    async with running(make_app(FakeEngine())) as app, raw(app) as http:
        response = await http.post("/v1/chat/completions", json=ASK,
                                   headers=[("x-request-timeout", "5"), ("x-request-timeout", "500")])
    assert response.status_code == 400 and "more than once" in response.json()["error"]["message"]
