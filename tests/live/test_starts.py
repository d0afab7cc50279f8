"""`chatgate serve` starts healthy every time (two rounds of two at once): the chat and embedding models load side by side."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.support.processes import Process, free_port

pytestmark = [pytest.mark.live, pytest.mark.untimed]
STARTS = 4  # two rounds of two; ten (five rounds) took most of a minute of make test
TOGETHER = 2  # two at once: half the wall time, and each start contends for the cores too


def test_serve_starts_healthy_four_times_in_a_row(tmp_path: Path) -> None:
    took: list[float] = []
    for round_ in range(STARTS // TOGETHER):
        began = time.monotonic()
        ports = [free_port() for _ in range(TOGETHER)]
        processes = [Process(["serve", "--port", str(port)], tmp_path / f"serve-{round_}-{i}.log")
                     for i, port in enumerate(ports)]
        try:
            for port, process in zip(ports, processes, strict=True):
                url = f"http://127.0.0.1:{port}"
                process.wait_healthy(url, deadline=180)
                took.append(time.monotonic() - began)
                models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
                assert {"SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"} <= {m["id"] for m in models}
        finally:
            for process in processes:
                process.stop()
        for i, process in enumerate(processes):
            assert "Traceback" not in process.log.read_text(errors="replace"), f"round {round_}, start {i}"
    assert len(took) == STARTS
    print(f"serve healthy after {min(took):.1f}-{max(took):.1f} s over {STARTS} starts, {TOGETHER} at a time")
