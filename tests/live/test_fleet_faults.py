"""A closed, self-healing fleet, as real processes: a keyed HTTPS fleet that refuses strangers,
a frozen worker that leaves rotation and rejoins, a frozen then killed controller, and a
bounded wait for a worker connection. Workers run the fake engine, so this stays light."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.app import Messages
from tests.support.live_fleet import M, LiveFleet, Tls
from tests.support.polling import apoll, poll

pytestmark = pytest.mark.live

MSG: Messages = [{"role": "user", "content": "tell me something"}]
KEY = "fleet-secret-123"


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)


def test_keyed_https_fleet_serves_and_refuses_strangers(tmp_path: Path) -> None:
    fleet = LiveFleet(tmp_path, key=KEY, tls=Tls.make(tmp_path))
    try:
        fleet.controller()
        fleet.worker("w1")
        fleet.api()
        poll(lambda: fleet.ready().get("workers") == {M: 1}, what="worker behind the API", timeout=15)
        assert fleet.url["w1"].startswith("https://") and fleet.table() == [fleet.url["w1"]]

        client = sdk(fleet.url["api"])
        assert client.chat.completions.create(model=M, messages=MSG).choices[0].message.content
        stream = client.chat.completions.create(model=M, messages=MSG, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with fleet.client() as http:
            for url, path in ((fleet.url["controller"], "/list_workers"), (fleet.url["w1"], "/worker_generate_stream"),
                              (fleet.url["w1"], "/worker_get_status"), (fleet.url["controller"], "/report_worker_down")):
                refused = http.post(f"{url}{path}", json={"worker_name": fleet.url["w1"], "model": M, "prompt": "x"})
                assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_fleet_key"
                assert http.get(f"{url}/health").status_code == 200
            # Even with the key, a stranger cannot join: the controller asks it for its status.
            stranger = {"worker_name": "https://127.0.0.1:9", "worker_status": {"model_names": [M]}}
            joined = http.post(f"{fleet.url['controller']}/register_worker", json=stranger, headers=fleet.auth())
            assert joined.status_code == 400 and "could not confirm" in joined.json()["error"]["message"]
            # A report about a live worker is checked, and the worker stays.
            report = {"worker_name": fleet.url["w1"]}
            assert http.post(f"{fleet.url['controller']}/report_worker_down", json=report, headers=fleet.auth()).status_code == 200
        log = fleet.processes["controller"].log
        poll(lambda: "answers its status probe: kept" in log.read_text(), what="probe of the reported worker", timeout=5)
        assert fleet.table() == [fleet.url["w1"]]
        # Without the CA bundle nothing in the fleet trusts these certificates.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{fleet.url['controller']}/health", timeout=2)
    finally:
        fleet.stop()


@dataclass
class Load:
    """Outcomes of streamed chats, with when each started and how long it took."""

    ok: list[tuple[float, float]] = field(default_factory=list)
    failed: list[tuple[float, str]] = field(default_factory=list)


async def stream_chat(http: httpx.AsyncClient, url: str, load: Load) -> None:
    begin = time.monotonic()
    body = {"model": M, "messages": MSG, "stream": True}
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                load.failed.append((begin, f"HTTP {response.status_code}"))
                return
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"error"' in line:
                    load.failed.append((begin, json.loads(line[6:])["error"]["message"]))
                    return
        load.ok.append((begin, time.monotonic() - begin))
    except httpx.HTTPError as exc:
        load.failed.append((begin, repr(exc)))


async def drive(url: str, load: Load, until: float, clients: int = 8) -> None:
    async with httpx.AsyncClient(timeout=20) as http:
        async def loop() -> None:
            while time.monotonic() < until:
                await stream_chat(http, url, load)

        await asyncio.gather(*(loop() for _ in range(clients)))


FIRST_FRAME = 2.0


def test_a_frozen_worker_leaves_rotation_and_rejoins_after_sigcont(tmp_path: Path) -> None:
    fleet = LiveFleet(tmp_path)
    try:
        fleet.controller()
        w1 = fleet.worker("w1")
        fleet.worker("w2")
        fleet.api("api", "--worker-first-frame-timeout", str(FIRST_FRAME), "--worker-frame-timeout", str(FIRST_FRAME))
        poll(lambda: fleet.ready().get("workers") == {M: 2}, what="both workers behind the API", timeout=15)

        load = Load()
        start = time.monotonic()

        async def scenario() -> tuple[float, float]:
            driving = asyncio.create_task(drive(fleet.url["api"], load, until=start + 10))
            await asyncio.sleep(2)  # steady load on both workers first
            os.kill(w1.proc.pid, signal.SIGSTOP)
            frozen = time.monotonic()
            # Polled without blocking the loop that drives the clients.
            out_of_rotation = await apoll(lambda: fleet.aready(want={M: 1}), what="the frozen worker out of rotation",
                                          timeout=FIRST_FRAME + 5)
            await driving
            return frozen, out_of_rotation

        frozen, out_of_rotation = asyncio.run(scenario())
        after = [(begin, took) for begin, took in load.ok if begin > frozen]
        print(f"frozen worker: out of rotation in {out_of_rotation:.2f}s; {len(load.ok)} ok, "
              f"{len(load.failed)} failed; slowest after the freeze {max(t for _, t in after):.2f}s")
        assert out_of_rotation < FIRST_FRAME + 2
        # Only streams already running on the frozen worker may fail; nothing started later does.
        assert all(begin < frozen for begin, _ in load.failed), load.failed
        assert len(load.failed) <= 8
        assert max(took for _, took in after) < FIRST_FRAME + 3  # at most one timeout, then the other
        assert len(after) > 20
        assert fleet.table() == [fleet.url["w2"]]  # the controller probed it and dropped it

        os.kill(w1.proc.pid, signal.SIGCONT)
        rejoin = poll(lambda: fleet.ready().get("workers") == {M: 2}, what="the thawed worker rejoining", timeout=10)
        print(f"rejoined {rejoin:.2f}s after SIGCONT")
        assert sorted(fleet.table()) == sorted([fleet.url["w1"], fleet.url["w2"]])
    finally:
        fleet.stop()


def test_a_frozen_then_killed_controller(tmp_path: Path) -> None:
    heartbeat = 2.0
    fleet = LiveFleet(tmp_path, heartbeat=heartbeat)
    try:
        controller = fleet.controller()
        fleet.worker("w1")
        fleet.worker("w2")
        fleet.api("api", "--controller-timeout", "1")
        poll(lambda: fleet.ready().get("workers") == {M: 2}, what="both workers behind the API", timeout=15)

        client = sdk(fleet.url["api"])

        def chats(seconds: float) -> list[tuple[int, float]]:
            statuses, end = [], time.monotonic() + seconds
            while time.monotonic() < end:
                begin = time.monotonic()
                response = client.chat.completions.with_raw_response.create(model=M, messages=MSG, max_tokens=4)
                statuses.append((response.status_code, time.monotonic() - begin))
            return statuses

        before = chats(1)
        os.kill(controller.proc.pid, signal.SIGSTOP)
        try:
            poll(lambda: fleet.ready().get("status") == "degraded", what="/ready saying degraded", timeout=5)
            during = chats(4)
            ready = httpx.get(f"{fleet.url['api']}/ready", timeout=2)
            slowest = max(t for _, t in during)
            print(f"controller frozen: {len(during)} chats, slowest {slowest:.2f}s "
                  f"(before: {max(t for _, t in before):.2f}s); /ready {ready.json()}")
            assert {s for s, _ in during} == {200} and len(during) > 10
            assert slowest < max(t for _, t in before) + 0.5  # nothing waits on the frozen controller
            assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        finally:
            os.kill(controller.proc.pid, signal.SIGCONT)

        os.kill(controller.proc.pid, signal.SIGKILL)
        controller.proc.wait()
        fleet.controller()
        whole = poll(lambda: len(fleet.table()) == 2, what="workers re-registering", timeout=heartbeat + 1,
                     ignore=(httpx.HTTPError,))
        poll(lambda: fleet.ready().get("status") == "ready", what="the API's table whole again", timeout=2)
        print(f"table whole {whole:.2f}s after the restarted controller was healthy")
    finally:
        fleet.stop()


def test_no_free_worker_connection_is_503_with_retry_after(tmp_path: Path) -> None:
    fleet = LiveFleet(tmp_path)
    try:
        fleet.controller()
        fleet.worker("w1", delay=0.2)
        fleet.api("api", "--worker-max-connections", "1", "--worker-pool-timeout", "0.5")
        poll(lambda: fleet.ready().get("workers") == {M: 1}, what="worker behind the API", timeout=15)
        client = sdk(fleet.url["api"])
        client.models.list()
        client.chat.completions.create(model=M, messages=MSG, max_tokens=1)  # details cached
        # Clients that leave mid-stream give their worker connection back (it used to leak,
        # until the pool was full): with one connection, every one of these needs it.
        for _ in range(6):
            with client.chat.completions.create(model=M, messages=MSG, stream=True) as stream:
                next(iter(stream))
        assert client.chat.completions.create(model=M, messages=MSG, max_tokens=2).choices

        with client.chat.completions.create(model=M, messages=MSG, stream=True) as stream:
            next(iter(stream))  # the one connection is now busy
            begin = time.monotonic()
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(model=M, messages=MSG)
            waited = time.monotonic() - begin
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"]
        assert 0.4 < waited < 3, waited
        assert fleet.ready().get("workers") == {M: 1}  # not reported: the worker is fine
    finally:
        fleet.stop()
