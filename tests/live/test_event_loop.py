"""The event loop never waits on compute: while one client posts an 8 MB prompt and another a
2,048-input embedding request, running streams keep their pace and `/health` answers at once."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.processes import Process, free_port

pytestmark = pytest.mark.live

MODEL = "SmolLM2-135M-Instruct"
EMBEDDER = "all-MiniLM-L6-v2"
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def url(processes: list[Process], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    # The body cap is raised so the 8 MB prompt reaches the server instead of a 413.
    serve = Process(["serve", "--port", str(port), "--max-request-bytes", str(16 * 1024 * 1024)],
                    tmp_path_factory.mktemp("logs") / "serve.log")
    processes.append(serve)
    serve.wait_healthy(f"http://127.0.0.1:{port}")
    yield f"http://127.0.0.1:{port}"


def stream_gaps(url: str, max_tokens: int, gaps: list[tuple[float, float]]) -> None:
    """Stream one chat completion, recording (time, gap since the previous piece of text)."""
    body = {"model": MODEL, "messages": STORY, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    last = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                now = time.perf_counter()
                if last is not None:
                    gaps.append((now, now - last))
                last = now


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def run_streams(url: str, max_tokens: int) -> tuple[list[tuple[float, float]], list[threading.Thread]]:
    gaps: list[tuple[float, float]] = []
    threads = [threading.Thread(target=stream_gaps, args=(url, max_tokens, gaps)) for _ in range(4)]
    for thread in threads:
        thread.start()
    return gaps, threads


def probe_health(url: str, busy: list[threading.Thread]) -> list[float]:
    """`/health` latencies, probed every 20 ms while any of `busy` runs."""
    latencies: list[float] = []
    with httpx.Client(timeout=10) as probe:
        while any(t.is_alive() for t in busy):
            started = time.perf_counter()
            assert probe.get(f"{url}/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    for thread in busy:
        thread.join()
    return latencies


def test_streams_and_health_keep_pace_during_huge_requests(url: str) -> None:
    # Warm up, then the normal pace of 4 streams.
    httpx.post(f"{url}/v1/embeddings", json={"model": EMBEDDER, "input": ["warm"]}, timeout=60)
    baseline, threads = run_streams(url, 48)
    quiet = probe_health(url, threads)

    gaps, threads = run_streams(url, 160)
    deadline = time.monotonic() + 60
    while len(gaps) < 8:  # every stream is running
        assert time.monotonic() < deadline
        time.sleep(0.05)
    results: dict[str, int] = {}

    def post(name: str, path: str, body: dict[str, object]) -> None:
        results[name] = httpx.post(f"{url}{path}", json=body, timeout=300).status_code

    prompt = "lorem ipsum " * (8 * 1024 * 1024 // 12)
    heavy = [
        threading.Thread(target=post, args=("prompt", "/v1/chat/completions",
                                            {"model": MODEL, "messages": [{"role": "user", "content": prompt}]})),
        threading.Thread(target=post, args=("embeddings", "/v1/embeddings",
                                            {"model": EMBEDDER, "input": [f"sentence number {i} of many" for i in range(2048)]})),
    ]
    begin = time.perf_counter()
    for thread in heavy:
        thread.start()
    health = probe_health(url, heavy)
    end = time.perf_counter()
    for thread in threads:
        thread.join()

    during = [gap for at, gap in gaps if begin <= at <= end + 0.5]
    normal = [gap for _, gap in baseline]
    report = (f"normal p99 {p99(normal) * 1000:.0f} ms, during p99 {p99(during) * 1000:.0f} ms "
              f"(ratio {p99(during) / p99(normal):.2f}, {len(during)} gaps over {end - begin:.1f} s); "
              f"health max {max(health) * 1000:.0f} ms over {len(health)} probes "
              f"(with the streams alone: max {max(quiet) * 1000:.0f} ms); {results}")
    print(report)
    assert results == {"prompt": 400, "embeddings": 200}, report
    assert len(during) >= 8, report
    # On a quiet machine every probe is well under 100 ms. On a loaded one the probes beside the
    # streams alone already reach 135 ms, and one CI run measured 289 ms during the huge requests
    # against that 135: the cores are shared with the embedding model's compute. The bound is 3x
    # the streams-alone maximum (at least 250 ms); a loop that parsed, tokenized or embedded the
    # huge bodies itself would hold `/health` for seconds.
    assert max(health) < max(0.25, 3 * max(quiet)), report
    # Decoding shares the two cores with the embedding model's compute; the engine runs its
    # model on every core but one and chunks its own jobs, so streams keep their pace within a
    # small factor: 1.56, 1.37 and 0.46 in three quiet runs, 2.02 in one full CI run. The bound
    # is 3x, well above those; a loop blocked by the huge bodies would stall streams for seconds.
    assert p99(during) < 3 * p99(normal), report
