"""`--log-format json` in a real process: every line on stderr is one JSON object, uvicorn's included,
and each request has one access line (uvicorn's own access line is off)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support.processes import Process, free_port

pytestmark = [pytest.mark.live, pytest.mark.untimed]


def test_json_logs_are_one_object_per_line_with_one_access_line_per_request(tmp_path: Path) -> None:
    port = free_port()
    server = Process(["serve", "--engine", "fake", "--embedding-model-path", "none", "--port", str(port),
                      "--log-format", "json"], tmp_path / "serve.log", env={"CHATGATE_LOG_LEVEL": "info"})
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_healthy(url)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                           json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert reply.status_code == 200
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's start-up lines, as JSON
    chats = [line for line in lines if line["logger"] == "chatgate.access" and line["path"] == "/v1/chat/completions"]
    assert len(chats) == 1, lines
    (chat,) = chats
    assert chat["request_id"] == reply.headers["x-request-id"] and chat["status"] == 200
    assert chat["completion_tokens"] == 3 and chat["model"] == "fake-model"
    assert not any(line["logger"] == "uvicorn.access" for line in lines)
    assert not any(line.get("path") == "/health" for line in lines)  # probes are debug-level lines
