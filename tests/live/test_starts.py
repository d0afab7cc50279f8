"""`chatgate serve` starts healthy every time: the chat and embedding models load side by side."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.live.conftest import Process, free_port

pytestmark = pytest.mark.live
STARTS = 10


def test_serve_starts_healthy_ten_times_in_a_row(tmp_path: Path) -> None:
    took: list[float] = []
    for attempt in range(STARTS):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        began = time.monotonic()
        process = Process(["serve", "--port", str(port)], tmp_path / f"serve-{attempt}.log")
        try:
            process.wait_healthy(url, deadline=180)
            took.append(time.monotonic() - began)
            models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
            assert {"SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"} <= {m["id"] for m in models}
        finally:
            process.stop()
        assert "Traceback" not in process.log.read_text(errors="replace"), f"start {attempt}"
    print(f"serve healthy after {min(took):.1f}-{max(took):.1f} s over {STARTS} starts")
