"""Rolling restarts lose nothing: SIGTERM on a worker or on `chatgate serve` stops new work,
deregisters the worker first, lets running streams finish up to --shutdown-timeout and ends the
rest with an error event, never a cut connection. Real processes, fake engine."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from chatgate.engines.fake import FakeEngine
from tests.support.app import Messages
from tests.support.live_fleet import M, LiveFleet
from tests.support.polling import poll
from tests.support.processes import Process, free_port

pytestmark = pytest.mark.live

MSG: Messages = [{"role": "user", "content": "tell me something"}]
SLOW = 0.15  # seconds per token: a stream takes ~7 s, longer than uvicorn's own 5 s grace


async def stream(http: httpx.AsyncClient, url: str, **extra: object) -> tuple[str, str]:
    """One streamed chat: (its text, its error message or "" if it ended in [DONE])."""
    body = {"model": M, "messages": MSG, "stream": True, "temperature": 0, **extra}
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return "", f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            text, done = "", False
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return text, event["error"]["message"]
                    text += "".join(c["delta"].get("content") or "" for c in event["choices"])
            return text, "" if done else "the stream ended without [DONE]"
    except httpx.HTTPError as exc:
        return "", repr(exc)


def restart_under_load(fleet: LiveFleet, name: str) -> dict[str, float]:
    """SIGTERM worker `name` and start it again, timing its way out and back."""
    old = fleet.processes[name]
    begin = time.monotonic()
    old.signal(signal.SIGTERM)
    # Deregistered first: out of the controller's table while its streams still run.
    left = poll(lambda: fleet.url[name] not in fleet.table(), what=f"{name} deregistered", timeout=3)
    still_running = old.proc.poll() is None
    old.proc.wait(timeout=40)
    exited = time.monotonic() - begin
    fleet.worker(name, delay=SLOW)
    rejoined = poll(lambda: fleet.ready().get("workers") == {M: 2}, what=f"{name} back", timeout=20)
    assert still_running, "the worker exited before it was out of the table"
    log = old.log.read_text()
    running = int(re.search(r"shutting down: (\d+) streams running", log).group(1))  # type: ignore[union-attr]
    assert "drained: 0 streams left" in log
    return {"deregistered_s": left, "exited_s": exited, "streams_running_at_sigterm": running, "rejoined_s": rejoined}


def test_workers_restarted_one_by_one_under_load_lose_nothing(tmp_path: Path) -> None:
    fleet = LiveFleet(tmp_path)
    try:
        fleet.controller()
        fleet.worker("w1", delay=SLOW)
        fleet.worker("w2", delay=SLOW)
        fleet.api("api", refresh=None)  # the API server's defaults
        poll(lambda: fleet.ready().get("workers") == {M: 2}, what="both workers behind the API", timeout=20)

        results: list[tuple[str, str]] = []
        figures: list[dict[str, float]] = []
        stop = asyncio.Event()

        async def scenario() -> None:
            async with httpx.AsyncClient(timeout=60) as http:

                async def client() -> None:
                    while not stop.is_set():
                        results.append(await stream(http, fleet.url["api"]))

                clients = [asyncio.create_task(client()) for _ in range(8)]
                await asyncio.sleep(3)
                for name in ("w1", "w2"):  # a rolling restart of the whole fleet
                    figures.append(await asyncio.to_thread(restart_under_load, fleet, name))
                    await asyncio.sleep(2)
                stop.set()
                await asyncio.gather(*clients)

        asyncio.run(scenario())
        failed = [error for _, error in results if error]
        print(f"rolling restart: {len(results)} streams, {len(failed)} failed; {figures}; failures: {failed[:3]}")
        assert failed == []
        assert {text for text, _ in results} == {FakeEngine.reply_for("<user> tell me something\n<assistant>")}
        assert len(results) > 20
        # Each worker had streams running when told to stop, finished them, then exited.
        assert all(f["streams_running_at_sigterm"] > 0 and f["exited_s"] < 30 for f in figures), figures
    finally:
        fleet.stop()


def test_serve_drains_on_sigterm_and_ends_late_streams_with_an_error_event(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = Process(["serve", "--engine", "fake", "--model-names", M, "--fake-token-delay", "0.2",
                     "--embedding-model-path", "none", "--port", str(port), "--shutdown-timeout", "3"],
                    tmp_path / "serve.log")
    try:
        serve.wait_healthy(url)

        async def scenario() -> tuple[httpx.Response, httpx.Response, list[tuple[str, str]], float]:
            async with httpx.AsyncClient(timeout=60) as http:
                short = asyncio.create_task(stream(http, url, max_tokens=8))  # ~1.6 s: finishes
                long = asyncio.create_task(stream(http, url))  # ~10 s: outlives the timeout
                await asyncio.sleep(0.6)
                began = time.monotonic()
                serve.signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                ready = await http.get(f"{url}/ready")
                refused = await http.post(f"{url}/v1/chat/completions", json={"model": M, "messages": MSG})
                results = list(await asyncio.gather(short, long))
                return ready, refused, results, time.monotonic() - began

        ready, refused, [(short_text, short_error), (long_text, long_error)], ended = asyncio.run(scenario())
        print(f"serve draining: /ready {ready.status_code} {ready.json()}; new request {refused.status_code} "
              f"{refused.json()}; short {short_text!r} {short_error!r}; long {long_text!r} {long_error!r}, "
              f"ended {ended:.2f}s after SIGTERM")
        assert ready.status_code == 503
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert "shutting down" in refused.json()["error"]["message"]
        assert short_error == "" and short_text
        assert long_text and "shut down before this response was finished" in long_error  # an error event, not a cut
        assert 2.5 < ended < 6
        assert serve.proc.wait(timeout=15) is not None
    finally:
        serve.stop()
