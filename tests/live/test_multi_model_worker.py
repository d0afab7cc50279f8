"""`chatgate worker --model default --model gemma3-270m` as a real process behind a controller
and an API server (real processes, real ports): both models registered by one worker, each
answering the openai SDK under its own name, and an unload of one that the fleet learns within
a heartbeat while the other keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from chatgate.engines.loading import DEFAULT_CHAT_NAME, GEMMA_NAME
from tests.support.app import sdk
from tests.support.polling import apoll
from tests.support.processes import Process, free_port

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")

pytestmark = [pytest.mark.live, pytest.mark.model, pytest.mark.anyio]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("worker-fleet")
    ports = {name: free_port() for name in ("controller", "worker", "api")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    started: list[Process] = []
    try:
        for name, args in (
            ("controller", ["controller", "--port", str(ports["controller"])]),
            ("worker", ["worker", "--port", str(ports["worker"]), "--host", "127.0.0.1",
                        "--controller-address", url["controller"], "--heartbeat-interval", "1",
                        "--model", "default engine=llama.cpp", "--model", "gemma3-270m engine=llama.cpp max-model-len=2048"]),
            ("api", ["api", "--port", str(ports["api"]), "--controller-address", url["controller"],
                     "--worker-table-refresh", "0.5"]),
        ):
            started.append(Process(args, logs / f"{name}.log"))
            started[-1].wait_healthy(url[name], deadline=300)
        yield url
    finally:
        for process in reversed(started):
            process.stop()


async def _listed(url: str) -> set[str]:
    return {m.id async for m in sdk(url).models.list()}


async def test_one_worker_process_serves_both_models_and_unloads_one(fleet: dict[str, str]) -> None:
    both = {DEFAULT_CHAT_NAME, GEMMA_NAME}

    async def listed_both() -> bool:
        return await _listed(fleet["api"]) == both

    await apoll(listed_both, what="the API server lists both models", timeout=30)
    client = sdk(fleet["api"])
    answers = {}
    for model in both:
        reply = await client.completions.create(model=model, prompt="Water boils at", max_tokens=6, temperature=0)
        assert reply.model == model and reply.usage is not None and reply.usage.completion_tokens >= 1
        answers[model] = reply.choices[0].text
    assert answers[DEFAULT_CHAT_NAME] != answers[GEMMA_NAME]
    async with httpx.AsyncClient(timeout=60) as http:
        status = (await http.post(f"{fleet['worker']}/worker_get_status", json={})).json()
        assert set(status["model_names"]) == both
        assert (await http.post(f"{fleet['worker']}/v1/models/unload", json={"model": GEMMA_NAME})).status_code == 200

        async def gemma_gone() -> bool:
            return await _listed(fleet["api"]) == {DEFAULT_CHAT_NAME}

        await apoll(gemma_gone, what="the fleet learns the unload", timeout=10)
        reply = await client.completions.create(model=DEFAULT_CHAT_NAME, prompt="Water boils at", max_tokens=6, temperature=0)
        assert reply.choices[0].text == answers[DEFAULT_CHAT_NAME]
        assert (await http.post(f"{fleet['worker']}/v1/models/load", json={"model": GEMMA_NAME})).status_code == 200
    await apoll(listed_both, what="the fleet learns the load", timeout=10)
