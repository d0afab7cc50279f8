"""`chatgate bench` end to end against a real server process (fake engine, so it is quick)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import CHATGATE, Process, free_port

pytestmark = pytest.mark.live


def test_bench_compares_named_targets_and_the_raw_engine(tmp_path: Path) -> None:
    port = free_port()
    server = Process(["serve", "--engine", "fake", "--embedding-model-path", "none", "--port", str(port)], tmp_path / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_healthy(url)
        out = tmp_path / "results"
        result = subprocess.run(
            [*CHATGATE, "bench", "--target", f"chatgate={url}/v1", "--target", f"peer={url}/v1",
             "--model", "fake-model", "--engine", "fake", "--raw",
             "--concurrency", "1,4", "--requests-per-client", "2", "--max-tokens", "16", "--ramp-up", "0.2",
             "--output-dir", str(out)],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads((out / "bench.json").read_text())
        assert list(report["targets"]) == ["chatgate", "peer", "raw"]
        for levels in report["targets"].values():
            assert [level["concurrency"] for level in levels] == [1, 4]
            for level in levels:
                assert level["errors"] == 0 and level["requests"] == 2 * level["concurrency"]
                assert level["completion_tokens"] > 0 and level["tokens_per_s"] > 0
                assert level["ttft_p50"] is not None and level["e2e_p95"] >= level["e2e_p50"]
        levels = {name: {lv["concurrency"]: lv for lv in levels} for name, levels in report["targets"].items()}
        for other in ("peer", "raw"):
            for concurrency in (1, 4):
                expected = levels["chatgate"][concurrency]["tokens_per_s"] / levels[other][concurrency]["tokens_per_s"]
                assert report["ratios"][f"chatgate_over_{other}_at_{concurrency}_tokens_per_s"] == pytest.approx(expected)
                assert f"chatgate_over_{other}_at_{concurrency}_ttft_p50" in report["ratios"]
        assert "chatgate_4_over_chatgate_1_tokens_per_s" in report["ratios"]
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "requests" in result.stderr  # progress was shown while it ran
    finally:
        server.stop()
