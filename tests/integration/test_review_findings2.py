"""Review findings on what landed since b151e19 (several models per worker, the memory check,
`min_priority`, completions' `response_format`, paged `input_items`), each a test of the
behaviour we want. Fake engine only: fast."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from openai.types.responses import ResponseInputParam

from chatgate.api.app import create_api_app
from chatgate.api.workers.local import local_pool
from chatgate.engines.base import GenerationOutput, SamplingParams
from chatgate.engines.fake import FakeEngine
from chatgate.engines.memory import MemoryNeed, check_models_fit
from chatgate.errors import InsufficientMemoryError
from chatgate.settings import ServeSettings, WorkerSettings
from chatgate.worker.app import create_worker_app
from chatgate.worker.served import ServedModels
from tests.support.anthropic_sdk import anthropic_sdk
from tests.support.app import make_app, raw, running, sdk
from tests.support.fake_lora import LoraFakeEngine
from tests.support.memory import GIB, SetMemory

pytestmark = pytest.mark.anyio

M = "fake-model"


async def _post(app: FastAPI, path: str, body: object, key: str | None = None) -> httpx.Response:
    async with raw(app) as http:
        return await http.post(path, json=body, headers={"Authorization": f"Bearer {key}"} if key else {})


# --- min_priority ---------------------------------------------------------------------------------


class PriorityRecorder(FakeEngine):
    """The fake model under `--scheduling-policy priority`, remembering each generation's priority."""

    def __init__(self) -> None:
        super().__init__(name=M, scheduling_policy="priority")
        self.priorities: list[int] = []

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationOutput]:
        self.priorities.append(params.priority)
        return super().generate(prompt_ids, params)


async def test_a_keys_priority_floor_holds_on_anthropics_messages_too(tmp_path: Path) -> None:
    """/v1/messages has no `priority` field, so its requests ask for none: they must run at the
    key's floor, as chat's do. They ran at 0, ahead of every request the floor kept back."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-low": {"name": "batch", "min_priority": 5}, "sk-any": None}))
    recorder = PriorityRecorder()
    async with running(make_app(recorder, api_keys_file=keys)) as app:
        await anthropic_sdk(app, "sk-low").messages.create(
            model=M, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
        await anthropic_sdk(app, "sk-any").messages.create(
            model=M, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert recorder.priorities == [5, 0]


# --- several models per worker: adapter loads -------------------------------------------------------


class SlowLoraEngine(LoraFakeEngine):
    """Reads an adapter for a moment, as a real engine does in a thread."""

    async def load_lora(self, name: str, path: str) -> None:
        await asyncio.sleep(0.05)
        await super().load_lora(name, path)


async def test_one_adapter_name_loaded_on_two_bases_at_once_is_served_once() -> None:
    """Two admins load `tuned` at once, one beside `a` and one beside `b`: the name check ran
    before either load finished, so both were 200 and `tuned` was served twice (requests went to
    whichever base the lookup found last; an unload removed one of the two)."""
    engines = [SlowLoraEngine(name="a"), SlowLoraEngine(name="b")]
    app = create_worker_app(WorkerSettings(no_register=True, engine="fake"), engines=list(engines))
    async with running(app):
        both = await asyncio.gather(*(
            _post(app, "/v1/load_lora_adapter", {"lora_name": "tuned", "lora_path": f"/adapters/{base}", "base_model_name": base})
            for base in ("a", "b")
        ))
        assert sorted(r.status_code for r in both) == [200, 400], [r.text for r in both]
        served: ServedModels = app.state.models
        assert served.model_names.count("tuned") == 1
        assert sum("tuned" in e.loaded for e in engines) == 1


@pytest.mark.parametrize("lora_path", ["x" * 4000, "~no-such-user-here/adapter"])
async def test_an_adapter_path_the_memory_estimate_cannot_read_is_no_500(lora_path: str) -> None:
    """The adapter's size is read before its load to check it fits: a path too long for the OS
    or naming an unknown user's home raised out of that estimate (a 500 with a traceback),
    even under --no-memory-check. A size that cannot be read is not checked; the load names
    any problem itself."""
    for check in (True, False):
        lora = LoraFakeEngine(name="a")
        app = create_worker_app(WorkerSettings(no_register=True, engine="fake", memory_check=check), engines=[lora])
        async with running(app):
            response = await _post(app, "/v1/load_lora_adapter", {"lora_name": "tuned", "lora_path": lora_path})
        assert response.status_code == 200, (check, response.text)


async def test_an_adapter_behind_a_dangling_link_is_no_500(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").symlink_to(tmp_path / "gone")
    lora = LoraFakeEngine(name="a")
    app = create_worker_app(WorkerSettings(no_register=True, engine="fake"), engines=[lora])
    async with running(app):
        response = await _post(app, "/v1/load_lora_adapter", {"lora_name": "tuned", "lora_path": str(folder)})
    assert response.status_code == 200, response.text


# --- the memory check ----------------------------------------------------------------------------


class NoEstimate(FakeEngine):
    """A model whose files cannot be sized (its estimate fails as a GGUF index of a newer
    version, or a vanished weights file, would)."""

    def memory_need(self) -> MemoryNeed | None:
        raise ValueError("unknown GGUF version 4")


async def test_no_memory_check_skips_the_estimate_and_an_estimate_that_fails_stops_nothing() -> None:
    """With --no-memory-check the estimate still ran before every load, so a model whose
    estimate fails could not start at all, whatever the flag said; with the check on, a failed
    estimate is as an unknown one (the CLI's start-up check already treats it so)."""
    for check in (False, True):
        config = ServeSettings(responses_store="memory", memory_check=check)
        app = create_api_app(config, local_pool(config, engines=[NoEstimate(name="odd")], memory=SetMemory(64 * GIB)))
        async with running(app):
            answer = await sdk(app).chat.completions.create(model="odd", messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content
            assert (await _post(app, "/v1/models/unload", {"model": "odd"})).status_code == 200
            assert (await _post(app, "/v1/models/load", {"model": "odd"})).status_code == 200


def test_one_models_memory_check_off_does_not_turn_it_off_for_the_others() -> None:
    """At start the check used the first model's settings for all: `memory-check=false` on the
    first `--model` skipped the sum of every other model, and its headroom was everyone's."""
    settings = ServeSettings(model=["default memory-check=false", "default model-names=second engine=transformers"])
    with pytest.raises(InsufficientMemoryError, match="`second`"):
        check_models_fit(settings.chat_models(), SetMemory(GIB // 4))
    roomy = ServeSettings(model=[
        "default engine=transformers memory-headroom-gib=0",
        "default model-names=second engine=transformers memory-headroom-gib=64",
    ])
    with pytest.raises(InsufficientMemoryError, match="64.00 GiB kept free"):
        check_models_fit(roomy.chat_models(), SetMemory(32 * GIB))


# --- input_items paging ----------------------------------------------------------------------------


async def test_input_item_ids_are_unique_so_paging_ends(fake_app: FastAPI) -> None:
    """A reasoning item sent back keeps its own `id`, which the client chooses: two with one
    id (or an empty one) made the cursors ambiguous, and the SDK's auto-pagination asked for
    the same page for ever."""
    items: list[Any] = [
        {"type": "reasoning", "id": "rs_same", "summary": []},
        {"type": "reasoning", "id": "rs_same", "summary": []},
        {"type": "reasoning", "id": "", "summary": []},
        {"role": "user", "content": "hi"},
    ]
    turns: ResponseInputParam = items
    client = sdk(fake_app)
    r = await client.responses.create(model=M, input=turns, max_output_tokens=4)
    walked: list[str] = []
    async for item in client.responses.input_items.list(r.id, order="asc", limit=1):
        walked.append(str(item.id))
        assert len(walked) <= len(items), walked  # not looping over one page
    assert len(walked) == len(items) and len(set(walked)) == len(items) and all(walked), walked
    assert walked[0] == "rs_same"  # a unique id of the client's is kept


def test_a_meminfo_not_in_the_kernels_format_tells_nothing(tmp_path: Path) -> None:
    """A MemAvailable line that is not a number (a sandbox's own /proc) failed every load."""
    from chatgate.engines.memory import meminfo_available

    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable: unknown\n")
    assert meminfo_available(tmp_path / "meminfo") is None


async def test_a_key_with_a_priority_floor_can_still_use_a_first_come_first_served_model(tmp_path: Path) -> None:
    """Under the default `--scheduling-policy fcfs` a worker refuses any non-zero `priority` (as
    vLLM does). A key's floor travels apart from the priority asked (`priority_floor`), so a key
    with a floor that asks for none is served there, not refused for a priority it never gave."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-low": {"min_priority": 5}}))
    async with running(make_app(FakeEngine(), api_keys_file=keys)) as app:
        answer = await sdk(app, "sk-low").chat.completions.create(model=M, messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content


class SizedEngine(FakeEngine):
    """A fake model of `weights_bytes` whose load takes a moment, as reading weights does."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resident = False

    async def start(self) -> None:
        await asyncio.sleep(0.1)
        await super().start()
        self.resident = True

    async def unload(self) -> None:
        self.resident = False
        await super().unload()


class Machine:
    """Memory of `total` bytes less what the resident models take."""

    def __init__(self, total: int, engines: list[SizedEngine]) -> None:
        self.total = total
        self.engines = engines

    def available(self, device: str) -> int | None:
        return self.total - sum(e.weights_bytes for e in self.engines if e.resident)


async def test_two_loads_at_once_are_checked_against_each_other() -> None:
    """Each model checks that it fits, then loads; two loads asked at once (two admins, or an
    admin and a request waking an idle model) each saw the memory the other was about to take,
    so both passed and together overcommitted the machine, which the check is there to prevent."""
    a, b = SizedEngine(name="a", weights_bytes=2 * GIB), SizedEngine(name="b", weights_bytes=2 * GIB)
    machine = Machine(5 * GIB, [a, b])
    config = ServeSettings(responses_store="memory", memory_headroom_gib=0)
    app = create_api_app(config, local_pool(config, engines=[a, b], memory=machine))
    async with running(app):
        for name in ("a", "b"):
            assert (await _post(app, "/v1/models/unload", {"model": name})).status_code == 200
        machine.total = 3 * GIB  # room for one of them now
        both = await asyncio.gather(*(_post(app, "/v1/models/load", {"model": name}) for name in ("a", "b")))
        assert sorted(r.status_code for r in both) == [200, 409], [r.text for r in both]
