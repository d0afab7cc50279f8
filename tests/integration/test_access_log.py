"""The access log: one line per request with what an operator needs, the key's name but never the
key, and no prompt text unless `--log-prompts` asks for it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from chatgate.engines.fake import FakeEngine
from chatgate.logs import JsonFormatter, TextFormatter
from tests.support.app import make_app, raw, running, sdk

pytestmark = pytest.mark.anyio

SECRET_PROMPT = "the-sleeping-giraffe-recipe"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [record.access for record in caplog.records if record.name == "chatgate.access"]  # type: ignore[attr-defined]


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(json.dumps({"sk-named": {"name": "team-a"}, "sk-unnamed": None}))
    return path


async def test_one_line_per_request_with_tokens_worker_and_key_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatgate.access")
    async with running(make_app(FakeEngine(), api_keys_file=keys_file(tmp_path))) as app:
        client = sdk(app, api_key="sk-named")
        reply = await client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=5,
            extra_headers={"traceparent": TRACEPARENT},
        )
        stream = await sdk(app, api_key="sk-unnamed").chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=4, stream=True)
        async for _ in stream:
            pass
        async with raw(app) as http:
            refused = await http.post("/v1/chat/completions", json={"model": "fake-model", "messages": []},
                                      headers={"Authorization": "Bearer sk-wrong"})
    assert refused.status_code == 401
    lines = access_lines(caplog)
    assert len(lines) == 3, lines
    first, streamed, denied = lines
    usage = reply.parse().usage
    assert usage is not None
    assert first["request_id"] == reply.headers["x-request-id"]
    assert first["trace_id"] == TRACEPARENT.split("-")[1]
    assert first["key"] == "team-a" and first["route"] == "/v1/chat/completions" and first["status"] == 200
    assert first["model"] == "fake-model" and first["method"] == "POST"
    assert (first["prompt_tokens"], first["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert usage.prompt_tokens_details is not None and first["cached_tokens"] == usage.prompt_tokens_details.cached_tokens
    assert first["worker"] and first["attempts"] == 1
    assert 0 < first["ttft_s"] <= first["total_s"]
    assert streamed["key"].startswith("sha256:") and streamed["completion_tokens"] == 4 and streamed["ttft_s"] is not None
    assert denied["status"] == 401 and denied["key"] is None and denied["completion_tokens"] == 0
    # Neither the keys nor the prompt appear anywhere in the logs.
    assert not any(secret in caplog.text for secret in ("sk-named", "sk-unnamed", "sk-wrong", SECRET_PROMPT))
    assert all("prompt" not in line for line in lines)


async def test_prompts_are_logged_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatgate.access")
    async with running(make_app(FakeEngine(context_length=100_000), log_prompts=True)) as app:
        await sdk(app).completions.create(model="fake-model", prompt=SECRET_PROMPT * 1000, max_tokens=2)
    (line,) = access_lines(caplog)
    assert line["prompt"].startswith(json.dumps(SECRET_PROMPT)[:-1]) and len(line["prompt"]) == 4096


def test_formatters_put_the_fields_in_the_line() -> None:
    fields = {"request_id": "req_1", "key": "team a", "status": 200, "worker": None}
    record = logging.LogRecord("chatgate.access", logging.INFO, __file__, 1, "POST %s", ("/v1/x",), None)
    record.access = fields
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "POST /v1/x" and line["level"] == "info" and line["logger"] == "chatgate.access"
    assert {k: line[k] for k in fields} == fields
    text = TextFormatter().format(record)
    assert text.endswith('POST /v1/x request_id=req_1 key="team a" status=200')  # None fields are left out


async def test_the_access_line_counts_what_the_prefix_cache_served(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatgate.access")
    long_prompt = "a shared system prompt " * 40
    async with running(make_app(FakeEngine(context_length=4096))) as app:
        for _ in range(2):
            reply = await sdk(app).completions.create(model="fake-model", prompt=long_prompt, max_tokens=2)
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached and cached > 0
    assert [line["cached_tokens"] for line in access_lines(caplog)] == [0, cached]
