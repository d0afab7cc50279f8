"""The fleet's guards, in one process: the fleet key, checked registrations, probed reports of a
worker down, how worker answers are told apart (4xx, 429, 5xx, silence, oversized frames), the
API server's table outliving its controller, and caches that follow the fleet."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest

from chatgate.api.workers.controller import ControllerPool
from chatgate.api.workers.http import Bounds
from chatgate.controller.app import create_controller_app
from chatgate.settings import ControllerSettings, WorkerSettings
from chatgate.worker.app import create_worker_app
from chatgate.engines.fake import FakeEngine
from tests.support.app import raw, running, sdk
from tests.support.fleet import MSG, M, fleet, requests_served, worker_app
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio

KEY = "s3cret-fleet-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


# The fleet key ---------------------------------------------------------------------------------


async def test_fleet_key_guards_every_controller_and_worker_endpoint_but_health() -> None:
    worker = create_worker_app(WorkerSettings(no_register=True, fleet_key=KEY), engine=FakeEngine())
    controller = create_controller_app(ControllerSettings(fleet_key=KEY))
    async with running(worker), running(controller):
        for app, paths in ((worker, ["/worker_get_status", "/model_details", "/worker_generate_stream", "/count_token"]),
                           (controller, ["/register_worker", "/list_workers", "/report_worker_down", "/list_models"])):
            async with raw(app) as http:
                assert (await http.get("/health")).status_code == 200
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                    for path in [*paths, "/metrics", "/ready"]:
                        if path == "/ready" and not headers:
                            continue  # a probe without credentials: below
                        response = await http.request("GET" if path in ("/metrics", "/ready") else "POST", path, json={}, headers=headers)
                        assert response.status_code == 401, (path, headers)
                        assert response.json()["error"]["code"] == "invalid_fleet_key"
                # Orchestrators probe readiness without secrets: the status, and nothing else.
                probe = await http.get("/ready")
                assert probe.status_code == 200 and probe.json() == {"status": "ready"}
                assert (await http.get("/ready", headers=AUTH)).json()["status"] == "ready"
                ok = await http.post(paths[0], json={}, headers=AUTH)
                assert ok.status_code in (200, 400) and ok.json() is not None


# Registrations -----------------------------------------------------------------------------------


BAD_REGISTRATIONS = {
    "not http": ({"worker_name": "ftp://w", "worker_status": {"model_names": [M]}}, "http"),
    "no host": ({"worker_name": "http://", "worker_status": {"model_names": [M]}}, "http"),
    "NaN speed": ('{"worker_name": "http://w", "worker_status": {"model_names": ["m"], "speed": NaN}}', "finite"),
    "infinite speed": ('{"worker_name": "http://w", "worker_status": {"model_names": ["m"], "speed": 1e999}}', "finite"),
    "huge speed": ({"worker_name": "http://w", "worker_status": {"model_names": [M], "speed": 1e300}}, "speed"),
    "zero speed": ({"worker_name": "http://w", "worker_status": {"model_names": [M], "speed": 0}}, "speed"),
    "negative queue": ({"worker_name": "http://w", "worker_status": {"model_names": [M], "queue_length": -1e6}}, "queue_length"),
    "too many names": ({"worker_name": "http://w", "worker_status": {"model_names": [f"m{i}" for i in range(65)]}}, "model_names"),
    "long name": ({"worker_name": "http://w", "worker_status": {"model_names": ["m" * 300]}}, "model_names"),
    "not a worker": ({"worker_name": "http://gone", "worker_status": {"model_names": [M]}}, "could not confirm"),
    "wrong key": ({"worker_name": "http://keyed", "worker_status": {"model_names": [M]}}, "fleet key"),
}


async def test_bad_registrations_get_400_with_a_reason_and_change_nothing() -> None:
    keyed = create_worker_app(WorkerSettings(no_register=True, fleet_key="another"), engine=FakeEngine())
    strangers = {"http://keyed": keyed, "http://gone": worker_app()}
    async with fleet("shortest_queue", {"http://w": worker_app()}, strangers=strangers, dead=("http://gone",)) as f:
        before = (await f.http.post("http://controller/list_workers")).json()
        for name, (body, reason) in BAD_REGISTRATIONS.items():
            content = body if isinstance(body, str) else json.dumps(body)
            response = await f.http.post("http://controller/register_worker", content=content,
                                         headers={"content-type": "application/json"})
            assert response.status_code == 400, name
            assert reason in response.json()["error"]["message"], (name, response.json())
        assert (await f.http.post("http://controller/list_workers")).json() == before


async def test_a_worker_joins_as_its_own_probe_describes_it() -> None:
    async with fleet("shortest_queue", {"http://w": worker_app()}) as f:
        claim = {"worker_name": "http://w", "worker_status": {"model_names": ["stolen"], "speed": 1e9, "queue_length": 0}}
        assert (await f.http.post("http://controller/register_worker", json=claim)).status_code == 200
        [entry] = (await f.http.post("http://controller/list_workers")).json()["workers"]
        assert entry["model_names"] == [M] and entry["speed"] == 1.0


# Reports of a worker down ----------------------------------------------------------------------


async def test_a_report_drops_a_worker_only_if_its_probe_fails() -> None:
    async with fleet("shortest_queue", {"http://up": worker_app(), "http://gone": worker_app()}) as f:
        f.machines["http://gone"].dead = True
        for address in ("http://up", "http://gone"):
            assert (await f.http.post("http://controller/report_worker_down", json={"worker_name": address})).status_code == 200
        await f.controller.state.membership.settled()
        workers = (await f.http.post("http://controller/list_workers")).json()["workers"]
        assert [w["address"] for w in workers] == ["http://up"]


# Worker answers ----------------------------------------------------------------------------------


def table(workers: dict[str, list[str]]) -> httpx.MockTransport:
    """A controller that serves a fixed worker table."""
    rows = [{"address": a, "model_names": names} for a, names in workers.items()]
    return httpx.MockTransport(lambda request: httpx.Response(200, json={"workers": rows}))


def params() -> object:
    from chatgate.protocol.worker import GenerateParams

    return GenerateParams(model=M, prompt="hi", max_new_tokens=4)


DETAILS = {"context_length": 1024, "chatgate_extensions": ["chat_template", "delta", "prompt_token_ids"]}
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def scripted(stream: Handler) -> httpx.MockTransport:
    """A chatgate worker whose `/worker_generate_stream` answers as `stream` says."""

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/model_details":
            return httpx.Response(200, json=DETAILS)
        return await stream(request)

    return httpx.MockTransport(handle)


def frames(*chunks: dict[str, object]) -> bytes:
    return b"".join(json.dumps(c).encode() + b"\0" for c in chunks)


async def answers(status: int, body: bytes | dict[str, object] = b"") -> Callable[[httpx.Request], Awaitable[httpx.Response]]:
    async def handle(request: httpx.Request) -> httpx.Response:
        if isinstance(body, dict):
            return httpx.Response(status, json=body)
        return httpx.Response(status, content=body)

    return handle


GOOD = frames({"text": "ok", "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


async def never(request: httpx.Request) -> httpx.Response:
    await asyncio.Event().wait()  # a frozen process: the connection is open, nothing comes
    raise AssertionError


class Api:
    """An API server over a fixed table of scripted workers; records the reports it sends."""

    def __init__(self, workers: dict[str, Handler], bounds: Bounds = Bounds()) -> None:
        self.reports: list[str] = []

        async def controller(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/report_worker_down":
                self.reports.append(json.loads(request.content)["worker_name"])
                return httpx.Response(200, json={"ok": True})
            rows = [{"address": a, "model_names": [M]} for a in workers]
            return httpx.Response(200, json={"workers": rows})

        mounts: dict[str, httpx.AsyncBaseTransport] = {"http://c": httpx.MockTransport(controller)}
        mounts |= {a: scripted(h) for a, h in workers.items()}
        self.pool = ControllerPool(http=httpx.AsyncClient(mounts=mounts), controller="http://c", refresh=60, bounds=bounds)

    async def chat(self, **kwargs: object) -> object:
        from chatgate.api.serving.chat import ChatServing
        from chatgate.protocol.openai import ChatCompletionRequest

        serving = ChatServing(pool=self.pool, max_n=4)
        request = ChatCompletionRequest.model_validate({"model": M, "messages": MSG, **kwargs})
        return await serving.create(request)


async def test_a_4xx_about_the_request_goes_back_to_the_client_unreported() -> None:
    from chatgate.errors import InvalidRequestError

    api = Api({"http://w": await answers(400, {"error": {"message": "bad temperature"}})})
    with pytest.raises(InvalidRequestError, match="bad temperature"):
        await api.chat()
    assert api.reports == []


async def test_a_429_is_retried_on_another_worker_and_only_all_busy_is_429() -> None:
    from chatgate.errors import OverloadedError

    api = Api({"http://busy": await answers(429, {"error": {"message": "full"}}), "http://free": await answers(200, GOOD)})
    for _ in range(4):
        result = await api.chat()
        assert result.choices[0].message.content == "ok"  # type: ignore[attr-defined]
    assert api.reports == []
    both_busy = Api({"http://a": await answers(429), "http://b": await answers(429)})
    with pytest.raises(OverloadedError):
        await both_busy.chat()
    assert both_busy.reports == []


async def test_5xx_and_silence_are_reported_and_retried_within_the_timeout() -> None:
    bounds = Bounds(first_frame=0.3)
    api = Api({"http://broken": await answers(503), "http://frozen": never, "http://fine": await answers(200, GOOD)}, bounds)
    loop = asyncio.get_running_loop()
    for _ in range(30):  # dispatch picks at random among idle workers: until both were hit
        begin = loop.time()
        result = await api.chat()
        assert result.choices[0].message.content == "ok"  # type: ignore[attr-defined]
        assert loop.time() - begin < 0.3 + 0.5  # at most one timeout, then another worker
        await asyncio.sleep(0)  # let the background reports go out
        if len(api.reports) == 2:
            break
    assert sorted(api.reports) == ["http://broken", "http://frozen"]
    assert [address for address, *_ in api.pool.load()] == ["http://fine"]


async def stalls(request: httpx.Request) -> httpx.Response:
    """A worker that answers one frame, then freezes with the stream open."""

    async def body() -> AsyncIterator[bytes]:
        yield frames({"text": "a"})
        await asyncio.Event().wait()
        yield b""

    return httpx.Response(200, content=body())


async def test_silence_mid_stream_ends_the_request_and_reports_the_worker() -> None:
    from chatgate.errors import WorkerError

    api = Api({"http://w": stalls}, Bounds(between_frames=0.2))
    with pytest.raises(WorkerError, match="stopped answering mid-stream"):
        await api.chat()
    await apoll(lambda: api.reports == ["http://w"], what="the stalled worker reported", timeout=5)


async def test_a_stream_broken_mid_way_ends_the_request_and_reports_the_worker() -> None:
    """A killed worker resets its streams at once: the next requests must not wait for the
    heartbeat to learn it is gone."""
    from chatgate.errors import WorkerError

    async def dies(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            yield frames({"text": "a"})
            raise httpx.ReadError("connection reset by peer")

        return httpx.Response(200, content=body())

    api = Api({"http://w": dies})
    with pytest.raises(WorkerError, match="failed mid-stream") as failed:
        await api.chat()
    assert "http://w" not in failed.value.message  # the client is not told where workers live
    await apoll(lambda: api.reports == ["http://w"], what="the broken worker reported", timeout=5)
    assert api.pool.load() == []


async def test_a_response_not_yet_sent_moves_on_when_its_worker_is_lost_mid_way() -> None:
    """A worker frozen or killed mid-generation: the client of a non-streamed request has seen
    nothing, so the request starts again on a live worker; a stream already read cannot."""
    from chatgate.errors import WorkerLostError

    for _ in range(10):  # dispatch picks at random: until the stalling worker was picked first
        api = Api({"http://frozen": stalls, "http://fine": await answers(200, GOOD)}, Bounds(between_frames=0.2))
        result = await api.chat()
        assert result.choices[0].message.content == "ok"  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        if api.reports:
            break
    assert api.reports == ["http://frozen"]
    alone = Api({"http://frozen": stalls}, Bounds(between_frames=0.2))
    with pytest.raises(WorkerLostError):  # no other worker: the error after the retries
        await alone.chat()
    streamed = Api({"http://frozen": stalls}, Bounds(between_frames=0.2))
    stream: Any = await streamed.chat(stream=True)
    with pytest.raises(WorkerLostError):
        async for _ in stream:
            pass


async def test_an_oversized_frame_ends_the_request_with_an_error_not_an_empty_200() -> None:
    from chatgate.errors import WorkerError

    async def floods(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(64):
                yield b"x" * 65536  # 4 MiB, never a delimiter

        return httpx.Response(200, content=body())

    api = Api({"http://w": floods}, Bounds(max_frame_bytes=1024 * 1024))
    with pytest.raises(WorkerError, match="over 1048576 bytes"):
        await api.chat()


async def test_no_free_connection_is_503_with_retry_after_and_no_report() -> None:
    async def exhausted(request: httpx.Request) -> httpx.Response:
        raise httpx.PoolTimeout("no connection free", request=request)

    api = Api({"http://w": exhausted})
    from chatgate.errors import NoHealthyWorkerError, WorkerUnavailableError

    with pytest.raises(NoHealthyWorkerError) as err:
        await api.chat()
    assert not isinstance(err.value, WorkerUnavailableError) and err.value.headers()["Retry-After"]
    assert api.reports == []


# The table outlives the controller; caches follow the fleet ---------------------------------------


async def test_without_its_controller_the_api_serves_from_its_table_and_says_degraded() -> None:
    async with fleet("shortest_queue", {"http://w1": worker_app(), "http://w2": worker_app()}) as f:
        f.controller_machine.dead = True
        with pytest.raises(Exception):
            await f.pool.refresh()
        client = sdk(f.api)
        results = await asyncio.gather(*(client.chat.completions.create(model=M, messages=MSG) for _ in range(6)))
        assert all(r.choices[0].message.content for r in results)
        async with raw(f.api) as http:
            ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert "controller" in ready.json()["reason"]
        f.controller_machine.dead = False
        await f.pool.refresh()
        async with raw(f.api) as http:
            assert (await http.get("/ready")).json()["status"] == "ready"


async def test_models_whose_workers_are_gone_are_forgotten() -> None:
    workers = {"http://a": worker_app(model="alpha"), "http://b": worker_app(model="beta")}
    async with fleet("shortest_queue", workers, models={"http://a": "alpha", "http://b": "beta"}) as f:
        client = sdk(f.api)
        await client.chat.completions.create(model="beta", messages=MSG)
        assert ("http://b", "beta") in f.pool._facts.details
        f.machines["http://b"].dead = True
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="beta", messages=MSG)
        async def dropped() -> bool:  # the report goes out in the background, then the probe
            workers = (await f.http.post("http://controller/list_workers")).json()["workers"]
            return [w["address"] for w in workers] == ["http://a"]

        await apoll(dropped, what="the controller drops the dead worker", timeout=5)
        await f.pool.refresh()
        assert [m.id for m in (await client.models.list()).data] == ["alpha"]
        async with raw(f.api) as http:
            ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json()["workers"] == {"alpha": 1}
        assert ("http://b", "beta") not in f.pool._facts.details and "http://b" not in f.pool._facts.in_flight
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="beta", messages=MSG)
        assert requests_served(workers["http://a"]) == 0 and requests_served(workers["http://b"]) == 1


async def test_a_malformed_answer_is_the_workers_error_not_a_500() -> None:
    from chatgate.errors import WorkerError

    api = Api({"http://w": await answers(200, b'{"text": 5, "usage": "none"}\0')})
    with pytest.raises(WorkerError, match="malformed frame"):
        await api.chat()


async def test_a_restarted_controllers_table_drops_nobody_while_it_settles() -> None:
    tables = [{"workers": [{"address": "http://w", "model_names": [M]}]}, {"workers": [], "settling": True}, {"workers": []}]

    async def controller(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=tables.pop(0))

    pool = ControllerPool(http=httpx.AsyncClient(transport=httpx.MockTransport(controller)), controller="http://c", refresh=60)
    await pool.refresh()
    await pool.refresh()  # the controller restarted: its workers have not registered again yet
    assert await pool.models() == [M] and pool.readiness() == {M: 1}
    await pool.refresh()  # settled: the worker did not come back
    assert await pool.models() == [] and pool.readiness() == {}
