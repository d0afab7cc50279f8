"""Clients that stall or crawl, against a real server process: a stream nobody reads is cancelled
after the write timeout with memory bounded meanwhile, and half-sent requests (slowloris) do not
keep a normal client from being served."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import Process, free_port

pytestmark = pytest.mark.live

M = "fake-model"


@pytest.fixture(scope="module")
def server(processes: list[Process], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    port = free_port()
    serve = Process(["serve", "--port", str(port), "--engine", "fake", "--embedding-model-path", "none",
                     "--stream-write-timeout", "2", "--fake-token-delay", "0.03"], tmp_path_factory.mktemp("logs") / "serve.log")
    processes.append(serve)
    serve.wait_healthy(f"http://127.0.0.1:{port}")
    yield f"http://127.0.0.1:{port}", serve.proc.pid


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match
    return int(match.group(1)) / 1024


def running(url: str) -> int:
    """Requests the worker is running now."""
    metrics = httpx.get(f"{url}/metrics").text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in metrics.splitlines()
               if line.startswith("chatgate_worker_queue_length{"))


def stalled_stream(port: int) -> socket.socket:
    """Send a large streamed request and never read the response."""
    body = json.dumps({
        "model": M, "messages": [{"role": "user", "content": "go"}], "stream": True, "n": 16,
        "logprobs": True, "top_logprobs": 20, "max_tokens": 1000, "logit_bias": {"256": -100},  # no end token
    }).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_a_stream_nobody_reads_is_cancelled_with_memory_bounded(server: tuple[str, int]) -> None:
    url, pid = server
    port = int(url.rsplit(":", 1)[1])
    httpx.post(f"{url}/v1/chat/completions", json={"model": M, "messages": [{"role": "user", "content": "warm"}]})
    before = rss_mb(pid)
    begin = time.monotonic()
    sockets = [stalled_stream(port) for _ in range(2)]
    peak = before
    deadline = time.monotonic() + 60
    started = False
    while True:
        peak = max(peak, rss_mb(pid))
        load = running(url)
        started = started or load > 0
        if started and load == 0:
            break
        assert time.monotonic() < deadline, f"the stalled streams were never cancelled (RSS {peak:.0f} MB)"
        time.sleep(0.2)
    took = time.monotonic() - begin
    print(f"RSS before {before:.0f} MB, peak with 2 stalled n=16 top_logprobs=20 streams {peak:.0f} MB; "
          f"slots free after {took:.1f} s")
    assert peak - before < 100
    assert took < 1000 * 0.03 * 0.7  # cancelled: the 1,000 tokens alone take 30 s
    for sock in sockets:
        sock.close()
    ok = httpx.post(f"{url}/v1/chat/completions", json={"model": M, "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200


def test_a_normal_client_is_served_during_a_slowloris_attack(server: tuple[str, int]) -> None:
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    half_sent = []
    for i in range(300):
        sock = socket.create_connection(("127.0.0.1", port))
        if i % 2:  # headers never finished
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/")
        else:  # body never finished
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"model\"")
        half_sent.append(sock)
    try:
        begin = time.perf_counter()
        response = httpx.post(f"{url}/v1/chat/completions", timeout=10,
                              json={"model": M, "messages": [{"role": "user", "content": "still there?"}]})
        took = time.perf_counter() - begin
        print(f"normal request during 300 half-sent ones: {response.status_code} in {took * 1000:.0f} ms")
        assert response.status_code == 200
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        for sock in half_sent:
            sock.close()
