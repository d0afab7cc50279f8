"""`chatgate bench` end to end against a real server process (fake engine, so it is quick)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.live.conftest import CHATGATE, Process, free_port

pytestmark = pytest.mark.live


def test_bench_reports_levels_ratios_and_a_chart(tmp_path: Path) -> None:
    port = free_port()
    server = Process(["serve", "--engine", "fake", "--embedding-model-path", "none", "--port", str(port)], tmp_path / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_healthy(url)
        out = tmp_path / "results"
        result = subprocess.run(
            [*CHATGATE, "bench", "--url", f"{url}/v1", "--model", "fake-model", "--engine", "fake", "--raw",
             "--concurrency", "1,4", "--requests-per-client", "2", "--max-tokens", "16", "--ramp-up", "0.2",
             "--output-dir", str(out)],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads((out / "bench.json").read_text())
        for target in ("http", "raw"):
            levels = report[target]
            assert [level["concurrency"] for level in levels] == [1, 4]
            for level in levels:
                assert level["errors"] == 0 and level["requests"] == 2 * level["concurrency"]
                assert level["completion_tokens"] > 0 and level["tokens_per_s"] > 0
                assert level["ttft_p50"] is not None and level["e2e_p95"] >= level["e2e_p50"]
        assert "http_4_over_http_1_tokens_per_s" in report["ratios"]
        assert "http_over_raw_at_4_tokens_per_s" in report["ratios"]
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "requests" in result.stderr  # progress was shown while it ran
    finally:
        server.stop()
