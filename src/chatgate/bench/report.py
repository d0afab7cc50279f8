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


def _over(mine: dict[str, Any], theirs: dict[str, Any], key: str) -> float | None:
    return mine[key] / theirs[key] if mine.get(key) and theirs.get(key) else None


def ratios(report: dict[str, Any]) -> dict[str, float]:
    """The ratios the targets are stated in, for whatever targets and levels the run has.

    The first target (the one under test) is compared with every other at each level it shares
    with it, and each target's top level with its single-stream level.
    """
    targets = {name: _by_concurrency(levels) for name, levels in report.get("targets", {}).items()}
    out: dict[str, float | None] = {}
    for name, levels in targets.items():
        if 1 in levels and len(levels) > 1:
            top = max(levels)
            out[f"{name}_{top}_over_{name}_1_tokens_per_s"] = _over(levels[top], levels[1], "tokens_per_s")
            out[f"{name}_{top}_over_{name}_1_ttft_p50"] = _over(levels[top], levels[1], "ttft_p50")
    baseline = report.get("hf_generate_tokens_per_s")
    first = next(iter(targets), None)
    if first is not None and baseline and 1 in targets[first]:
        out[f"{first}_1_over_hf_generate_tokens_per_s"] = targets[first][1]["tokens_per_s"] / baseline
    for other in list(targets)[1:]:
        for concurrency in sorted(set(targets[first or ""]) & set(targets[other])):
            mine, theirs = targets[first or ""][concurrency], targets[other][concurrency]
            for key in ("tokens_per_s", "ttft_p50"):
                out[f"{first}_over_{other}_at_{concurrency}_{key}"] = _over(mine, theirs, key)
    return {key: value for key, value in out.items() if value is not None}


def chart(report: dict[str, Any], path: Path) -> Path:
    """Tokens/s and TTFT p50 against concurrency, one line per target, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^vP*X"
    for index, (name, levels) in enumerate(report.get("targets", {}).items()):
        marker = markers[index % len(markers)]
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
        if axis.get_legend_handles_labels()[0]:  # a quality-only run draws no lines
            axis.legend()
    figure.suptitle(f"chatgate bench: {report.get('model', '')}, {report.get('max_tokens', '')} max tokens")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _fmt(value: float | None) -> str:
    return f"{value:7.3f}" if value is not None else "      -"


def table(report: dict[str, Any]) -> str:
    """A plain-text table of every level of every target."""
    targets: dict[str, list[dict[str, Any]]] = report.get("targets", {})
    width = max([6, *(len(name) for name in targets)])
    lines = [f"{'target':{width}} {'conc':>4} {'tok/s':>8} {'ttft50':>7} {'ttft95':>7} {'itl50':>7} {'itl95':>7} {'e2e50':>7} {'err':>4}"]
    for name, levels in targets.items():
        for level in levels:
            lines.append(
                f"{name:{width}} {level['concurrency']:>4} {level['tokens_per_s']:8.1f} {_fmt(level['ttft_p50'])} "
                f"{_fmt(level['ttft_p95'])} {_fmt(level['itl_p50'])} {_fmt(level['itl_p95'])} {_fmt(level['e2e_p50'])} "
                f"{level['errors']:>4}"
            )
    return "\n".join(lines)
