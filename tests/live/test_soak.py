"""A one-minute soak (`chatgate soak --minutes 1`): a fake-engine fleet under mixed traffic,
a worker and the controller killed with -9 and restarted; the soak must pass and report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import CHATGATE

pytestmark = pytest.mark.live


def test_one_minute_soak_passes_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    result = subprocess.run([*CHATGATE, "soak", "--minutes", "1", "--kill-every", "25", "--output-dir", str(out)],
                            capture_output=True, text=True, timeout=400)
    report = json.loads((out / "soak.json").read_text())
    print(json.dumps({k: report[k] for k in ("checks", "requests", "failures_explained_by_kills", "events",
                                              "latency_per_minute", "rss_growth_after_warmup")}))
    assert result.returncode == 0, (report["checks"], report["unexplained_5xx"][:3], report["hung"][:3], result.stderr[-2000:])
    assert report["pass"] and report["requests"] > 100
    kills = [e["what"] for e in report["events"] if e["what"].startswith("kill")]
    assert "kill -9 worker1" in kills and "kill -9 controller" in kills
    routes = report["by_route"]
    for kind in ("chat", "chat_stream", "completion", "completion_stream", "embeddings", "tools"):
        assert routes[kind].get("ok", 0) > 0, kind
    assert all(set(routes[k]) == {"refused"} for k in routes if k.startswith("bad_"))
    assert routes["disconnect"].get("left", 0) > 0
    assert set(report["rss_per_minute"]) == {"api", "controller", "worker1", "worker2"}
    assert report["latency_per_minute"][0]["p95_s"] is not None
    assert (out / "soak.png").stat().st_size > 10_000
