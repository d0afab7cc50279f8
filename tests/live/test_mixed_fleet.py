"""A mixed fleet: one controller, a local-engine worker and an `openai` worker (forwarding to
another chatgate process) serving the same model name. The API server balances across both; when
the upstream is killed, the `openai` worker answers 503 and every request fails over."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.live_fleet import streamed_chats
from tests.support.processes import Process, free_port, requests_served_at, worker_count

pytestmark = pytest.mark.live

M = "fake-model"


BODY = {"model": M, "messages": [{"role": "user", "content": "mixed fleet"}]}


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
        while worker_count(url["api"], M) != 2:
            assert time.monotonic() < deadline, "both workers never registered"
            time.sleep(0.2)

        assert asyncio.run(streamed_chats(url["api"], BODY, 24)) == [200] * 24
        before = requests_served_at(url["local"]), requests_served_at(url["forward"])
        print("requests per worker before the kill:", before)
        assert before[0] > 0 and before[1] > 0  # both engines took traffic

        os.kill(upstream.proc.pid, signal.SIGKILL)
        upstream.proc.wait()
        assert asyncio.run(streamed_chats(url["api"], BODY, 24)) == [200] * 24  # every request failed over
        after = requests_served_at(url["local"]), requests_served_at(url["forward"])
        print("requests per worker after the kill:", after)
        assert after[0] - before[0] == 24  # the local worker answered them all
    finally:
        for process in reversed(processes):
            process.stop()
