"""A mixed fleet: one controller, a local-engine worker and an `openai` worker (forwarding to
another chatgate process) serving the same model name. The API server balances across both; when
the upstream is killed, the `openai` worker answers 503 and every request fails over."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.live.conftest import Process, free_port
from tests.live.test_chaos import served, worker_count

pytestmark = pytest.mark.live

M = "fake-model"


async def _chats(url: str, count: int, concurrency: int = 6) -> list[int]:
    """Statuses of `count` streamed chats, `concurrency` at a time; a stream must end in [DONE]."""
    body = {"model": M, "messages": [{"role": "user", "content": "mixed fleet"}], "stream": True}
    limit = asyncio.Semaphore(concurrency)

    async def one(http: httpx.AsyncClient) -> int:
        async with limit, http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line]
            return response.status_code if lines and lines[-1] == "data: [DONE]" and "error" not in lines[-2] else -1

    async with httpx.AsyncClient(timeout=60) as http:
        return list(await asyncio.gather(*(one(http) for _ in range(count))))


def test_balance_and_failover_across_engines(tmp_path: Path) -> None:
    port = {n: free_port() for n in ("upstream", "controller", "local", "forward", "api")}
    url = {n: f"http://127.0.0.1:{p}" for n, p in port.items()}
    processes: list[Process] = []

    def start(name: str, args: list[str]) -> Process:
        process = Process([*args, "--port", str(port[name])], tmp_path / f"{name}.log")
        processes.append(process)
        process.wait_healthy(url[name])
        return process

    worker = ["worker", "--host", "127.0.0.1", "--controller-address", url["controller"], "--heartbeat-interval", "1"]
    try:
        upstream = start("upstream", ["serve", "--engine", "fake", "--model-names", M, "--fake-token-delay", "0.02",
                                      "--embedding-model-path", "none", "--no-playground"])
        start("controller", ["controller", "--host", "127.0.0.1"])
        start("local", [*worker, "--engine", "fake", "--model-names", M, "--fake-token-delay", "0.02"])
        start("forward", [*worker, "--engine", "openai", "--upstream-url", f"{url['upstream']}/v1"])
        start("api", ["api", "--controller-address", url["controller"], "--worker-table-refresh", "0.5"])
        deadline = time.monotonic() + 20
        while worker_count(url["api"]) != 2:
            assert time.monotonic() < deadline, "both workers never registered"
            time.sleep(0.2)

        assert asyncio.run(_chats(url["api"], 24)) == [200] * 24
        before = served(url["local"]), served(url["forward"])
        print("requests per worker before the kill:", before)
        assert before[0] > 0 and before[1] > 0  # both engines took traffic

        os.kill(upstream.proc.pid, signal.SIGKILL)
        upstream.proc.wait()
        assert asyncio.run(_chats(url["api"], 24)) == [200] * 24  # every request failed over
        after = served(url["local"]), served(url["forward"])
        print("requests per worker after the kill:", after)
        assert after[0] - before[0] == 24  # the local worker answered them all
    finally:
        for process in reversed(processes):
            process.stop()
