"""Latency and throughput figures from load-run records, the ratios between them, and a chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from chatgate.bench.load import LevelResult


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(level: LevelResult) -> dict[str, Any]:
    """One concurrency level's figures (seconds, tokens per second)."""
    ok = [r for r in level.records if r.error is None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [b - a for r in ok for a, b in zip(r.arrivals, r.arrivals[1:])]
    e2e = [r.e2e for r in ok]
    tokens = sum(r.tokens for r in ok)
    return {
        "concurrency": level.concurrency,
        "requests": len(level.records),
        "errors": len(level.records) - len(ok),
        "completion_tokens": tokens,
        "wall_s": level.wall,
        "tokens_per_s": tokens / level.wall if level.wall else 0.0,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p95": percentile(ttft, 95),
        "itl_p50": percentile(itl, 50),
        "itl_p95": percentile(itl, 95),
        "e2e_p50": percentile(e2e, 50),
        "e2e_p95": percentile(e2e, 95),
        "mean_tokens_per_request": statistics.fmean([r.tokens for r in ok]) if ok else 0.0,
        "error_samples": sorted({r.error for r in level.records if r.error})[:3],
    }


def _by_concurrency(levels: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {level["concurrency"]: level for level in levels}


def ratios(report: dict[str, Any]) -> dict[str, float]:
    """The ratios the targets are stated in, for whatever levels the run has."""
    out: dict[str, float] = {}
    http = _by_concurrency(report.get("http", []))
    raw = _by_concurrency(report.get("raw", []))
    if 1 in http:
        top = max(http)
        out[f"http_{top}_over_http_1_tokens_per_s"] = http[top]["tokens_per_s"] / http[1]["tokens_per_s"]
        if http[1]["ttft_p50"] and http[top]["ttft_p50"]:
            out[f"http_{top}_over_http_1_ttft_p50"] = http[top]["ttft_p50"] / http[1]["ttft_p50"]
        baseline = report.get("hf_generate_tokens_per_s")
        if baseline:
            out["http_1_over_hf_generate_tokens_per_s"] = http[1]["tokens_per_s"] / baseline
    for concurrency in sorted(set(http) & set(raw)):
        out[f"http_over_raw_at_{concurrency}_tokens_per_s"] = (
            http[concurrency]["tokens_per_s"] / raw[concurrency]["tokens_per_s"]
        )
    return out


def chart(report: dict[str, Any], path: Path) -> Path:
    """Tokens/s and TTFT p50 against concurrency, one line per target, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, marker in (("http", "o"), ("raw", "s")):
        levels = report.get(name) or []
        if not levels:
            continue
        xs = [level["concurrency"] for level in levels]
        speed.plot(xs, [level["tokens_per_s"] for level in levels], marker=marker, label=name)
        ttft.plot(xs, [level["ttft_p50"] or 0 for level in levels], marker=marker, label=name)
    if report.get("hf_generate_tokens_per_s"):
        speed.axhline(report["hf_generate_tokens_per_s"], color="grey", linestyle="--", label="HF generate, 1 seq")
    speed.set(title="Aggregate throughput", xlabel="concurrent streams", ylabel="completion tokens/s")
    ttft.set(title="Time to first token (p50)", xlabel="concurrent streams", ylabel="seconds")
    for axis in (speed, ttft):
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"chatgate bench: {report.get('model', '')}, {report.get('max_tokens', '')} max tokens")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def table(report: dict[str, Any]) -> str:
    """A plain-text table of every level."""
    lines = [f"{'target':6} {'conc':>4} {'tok/s':>8} {'ttft50':>7} {'ttft95':>7} {'itl50':>7} {'itl95':>7} {'e2e50':>7} {'err':>4}"]
    for name in ("raw", "http"):
        for level in report.get(name) or []:
            def fmt(value: float | None) -> str:
                return f"{value:7.3f}" if value is not None else "      -"

            lines.append(
                f"{name:6} {level['concurrency']:>4} {level['tokens_per_s']:8.1f} {fmt(level['ttft_p50'])} "
                f"{fmt(level['ttft_p95'])} {fmt(level['itl_p50'])} {fmt(level['itl_p95'])} {fmt(level['e2e_p50'])} "
                f"{level['errors']:>4}"
            )
    return "\n".join(lines)
