"""Chaos with real processes: a controller, two workers of one model, an API server and 16
streaming clients; one worker is killed with SIGKILL mid-run, then restarted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support.polling import apoll, poll
from tests.support.processes import Process, free_port, requests_served_at, worker_count

pytestmark = pytest.mark.live

M = "fake-model"
HEARTBEAT = 2.0


@dataclass
class Outcome:
    ok: int = 0
    failed_before_streaming: list[str] = field(default_factory=list)
    failed_mid_stream: int = 0


async def stream_once(http: httpx.AsyncClient, url: str, outcome: Outcome) -> None:
    body = {"model": M, "messages": [{"role": "user", "content": "tell me something"}], "stream": True}
    chunks = 0
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                outcome.failed_before_streaming.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    if chunks <= 1:  # only the role chunk had arrived: nothing was generated yet
                        outcome.failed_before_streaming.append(event["error"]["message"])
                    else:
                        outcome.failed_mid_stream += 1
                    return
                chunks += 1
        outcome.ok += 1
    except httpx.HTTPError as exc:
        outcome.failed_before_streaming.append(repr(exc))


async def clients(url: str, outcome: Outcome, until: float, count: int = 16) -> None:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=count + 4)) as http:
        async def loop() -> None:
            while time.monotonic() < until:
                await stream_once(http, url, outcome)

        await asyncio.gather(*(loop() for _ in range(count)))


async def aworker_count(http: httpx.AsyncClient, url: str) -> int:
    """`processes.worker_count` without blocking the event loop that drives the load clients."""
    try:
        return int((await http.get(f"{url}/ready", timeout=1)).json()["workers"].get(M, 0))
    except (httpx.HTTPError, ValueError, KeyError):
        return -1


def test_kill_a_worker_mid_run(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("controller", "w1", "w2", "api")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    processes: list[Process] = []

    def worker(name: str) -> Process:
        p = Process(["worker", "--engine", "fake", "--fake-token-delay", "0.02", "--model-names", M,
                     "--host", "127.0.0.1", "--port", str(ports[name]), "--controller-address", url["controller"],
                     "--heartbeat-interval", str(HEARTBEAT)], tmp_path / f"{name}.log")
        processes.append(p)
        return p

    try:
        controller = Process(["controller", "--host", "127.0.0.1", "--port", str(ports["controller"]),
                              "--heartbeat-expiration", str(3 * HEARTBEAT)], tmp_path / "controller.log")
        processes.append(controller)
        controller.wait_healthy(url["controller"])
        w1, w2 = worker("w1"), worker("w2")
        w1.wait_healthy(url["w1"])
        w2.wait_healthy(url["w2"])
        api = Process(["api", "--port", str(ports["api"]), "--controller-address", url["controller"],
                       "--worker-table-refresh", "0.5"], tmp_path / "api.log")
        processes.append(api)
        api.wait_healthy(url["api"])
        poll(lambda: worker_count(url["api"], M) == 2, what="the API server sees both workers", timeout=10)

        outcome = Outcome()
        loop = asyncio.new_event_loop()
        start = time.monotonic()
        load = loop.create_task(clients(url["api"], outcome, until=start + 9))

        async def chaos() -> dict[str, float]:
            # Let the clients run on both workers first; counted, so polling for it is moot.
            await asyncio.sleep(3)
            before = requests_served_at(url["w1"]), requests_served_at(url["w2"])
            os.kill(w1.proc.pid, signal.SIGKILL)
            async with httpx.AsyncClient() as http:

                async def one_left() -> bool:
                    return await aworker_count(http, url["api"]) == 1

                gone = await apoll(one_left, what="the killed worker out of rotation", timeout=5)
            return {"out_of_rotation_s": gone, "w1_before": before[0], "w2_before": before[1]}

        figures = loop.run_until_complete(chaos())
        loop.run_until_complete(load)
        loop.close()
        print("chaos figures:", figures, outcome)
        assert figures["w1_before"] > 0 and figures["w2_before"] > 0  # both took traffic before the kill
        assert figures["out_of_rotation_s"] < 2.0
        assert outcome.failed_before_streaming == []
        assert outcome.ok > 50

        # The restarted worker rejoins within one heartbeat interval of coming up.
        w1 = worker("w1")
        w1.wait_healthy(url["w1"])
        rejoin = poll(lambda: worker_count(url["api"], M) == 2, what="the restarted worker rejoins", timeout=10)
        print("rejoin after health:", rejoin)
        assert rejoin <= HEARTBEAT
        after = Outcome()
        asyncio.run(clients(url["api"], after, until=time.monotonic() + 3))
        assert after.failed_before_streaming == [] and after.ok > 10
        assert requests_served_at(url["w1"]) > 0  # the new process takes traffic again
    finally:
        for p in reversed(processes):
            p.stop()
