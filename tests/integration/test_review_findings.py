"""Security review findings on what landed since 1396fbe, each as a test of the behaviour we want
(they fail until the product code is fixed). Fake engine only: fast."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import openai
import pytest

from chatgate.engines.fake import FakeEngine
from chatgate.logs import TextFormatter
from tests.support.app import make_app, raw, running, sdk
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio

M = "fake-model"


# --- stored responses ---------------------------------------------------------------------------


async def test_one_key_cannot_evict_another_keys_stored_responses() -> None:
    """The store's count and byte bounds are global and evict the oldest first, whoever owns
    them: one key making `responses_max_count` responses wipes every other key's conversations
    (their `previous_response_id` then 404s). A key should evict its own responses first."""
    async with running(make_app(FakeEngine(), api_keys=["sk-a", "sk-b"], responses_max_count=4)) as app:
        a, b = sdk(app, "sk-a"), sdk(app, "sk-b")
        mine = await a.responses.create(model=M, input="remember me", max_output_tokens=5)
        for _ in range(4):
            await b.responses.create(model=M, input="flood", max_output_tokens=5)
        assert (await a.responses.retrieve(mine.id)).id == mine.id


# --- worker queue bounds --------------------------------------------------------------------------


class SlowCrossEncoder(FakeEngine):
    """A fake cross-encoder whose scoring takes a while, counting how many score at once."""

    def __init__(self) -> None:
        super().__init__()
        self.info = dataclasses.replace(self.info, cross_encoder=True)
        self.scoring = 0
        self.most = 0

    def pair_tokens(self, first: str, second: str) -> int:
        return len(first) + len(second)

    async def score_pairs(self, pairs: list[tuple[str, str]]) -> list[float]:
        self.scoring += 1
        self.most = max(self.most, self.scoring)
        try:
            await asyncio.sleep(0.3)
        finally:
            self.scoring -= 1
        return [0.5] * len(pairs)


async def test_cross_encoder_scoring_passes_the_workers_queue_bounds() -> None:
    """`/worker_score` (rerank and score on a cross-encoder) skips the worker's `RequestQueue`:
    `--limit-worker-concurrency` and `--max-waiting` never refuse it, so a flood of reranks
    queues without bound on the engine's one thread (and delays every other caller)."""
    engine = SlowCrossEncoder()
    async with running(make_app(engine, limit_worker_concurrency=1, max_waiting=1)) as app, raw(app) as http:
        body = json.dumps({"model": M, "query": "q", "documents": ["a", "b"]})
        replies = await asyncio.gather(*(
            http.post("/v1/rerank", content=body, headers={"content-type": "application/json"}) for _ in range(4)
        ))
    statuses = sorted(r.status_code for r in replies)
    assert engine.most == 1 and 429 in statuses, (engine.most, statuses)


# --- the access log -------------------------------------------------------------------------------


async def test_an_unauthenticated_path_cannot_forge_access_lines(caplog: pytest.LogCaptureFixture) -> None:
    """The access line's message is `METHOD PATH STATUS` with the percent-decoded path as is:
    a caller with no key sends `%0A` and writes a whole forged line into the text log."""
    caplog.set_level(logging.DEBUG, logger="chatgate.access")
    forged = "2026-12-05 12:00:00,000 INFO chatgate.access: POST /v1/chat/completions 200 key=team-admin"
    async with running(make_app(FakeEngine(), api_keys=["sk-a"])) as app, raw(app) as http:
        r = await http.get("/v1/models%0A" + forged.replace(" ", "%20"))
    assert r.status_code == 401
    lines = [TextFormatter().format(rec) for rec in caplog.records if rec.name == "chatgate.access"]
    assert lines and all("\n" not in line and "\r" not in line for line in lines), lines


# --- charging ------------------------------------------------------------------------------------


async def test_a_request_cut_by_its_deadline_before_its_first_token_is_charged_its_prompt(tmp_path: Path) -> None:
    """tpm is charged from the worker's usage, which arrives with the first chunk: a request
    that `x-request-timeout` ends during its prefill is charged nothing, so a key can have any
    number of full-context prefills computed for free (rpm is its only bound)."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-metered": {"tpm": 1_000_000}}))
    engine = FakeEngine(prefill_delay=1.0)
    auth = {"authorization": "Bearer sk-metered"}
    async with running(make_app(engine, api_keys_file=keys)) as app, raw(app) as http:
        body = {"model": M, "messages": [{"role": "user", "content": "x" * 500}], "max_tokens": 5}
        r = await http.post("/v1/chat/completions", json=body, headers={**auth, "x-request-timeout": "0.3"})
        assert r.status_code == 504, r.text
        await apoll(lambda: engine.active == 0, what="the generation stopped", timeout=5)

        async def charged() -> bool:  # the charge is counted after the 504 is sent
            left = (await http.get("/v1/models", headers=auth)).headers["x-ratelimit-remaining-tokens"]
            return 1_000_000 - int(left) >= 500

        await apoll(charged, what="the cut request's prompt charged", timeout=5)


# --- cross-key side channels ----------------------------------------------------------------------


def caching_upstream() -> Any:
    """An OpenAI-compatible server with one prefix cache for everyone (as vLLM's without a
    salt): a prompt it has seen before is reported as cached."""
    import httpx

    from tests.support.fake_upstream import sse_response

    seen: set[str] = set()

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        prompt = json.dumps(body.get("messages"))
        cached = 8 if prompt in seen else 0
        seen.add(prompt)
        usage = {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9, "prompt_tokens_details": {"cached_tokens": cached}}
        events: list[dict[str, Any]] = [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]},
            {"choices": [], "usage": usage},
        ]
        return sse_response(events, delay=0)

    return handle


async def test_an_upstreams_shared_cache_does_not_tell_one_key_what_another_asked() -> None:
    """`--engine openai` does not forward the per-key cache salt, and the upstream's
    `cached_tokens` now reach the client: key B learns whether key A sent a given prompt (its
    system prompt, a document) by sending a guess and reading `cached_tokens`."""
    from chatgate.api.app import create_api_app
    from chatgate.settings import ServeSettings
    from tests.support.fake_upstream import upstream_pool

    app = create_api_app(ServeSettings(api_keys=["sk-a", "sk-b"]), upstream_pool(caching_upstream()))
    secret: Any = [{"role": "user", "content": "the merger with Initech closes on Friday"}]
    async with running(app):
        await sdk(app, "sk-a").chat.completions.create(model=M, messages=secret)
        probe = await sdk(app, "sk-b").chat.completions.create(model=M, messages=secret)
    details = probe.usage.prompt_tokens_details if probe.usage else None
    assert not (details and details.cached_tokens), probe.usage


# --- chat_template_kwargs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["self", "conversations"])
async def test_template_variables_that_collide_with_the_renderers_own_arguments_are_a_400(tmp_path: Path, name: str) -> None:
    """`self` (Template.render's, apply_chat_template's) and `conversations`
    (render_jinja_template's) are not in the reserved names: with `--chat-template` the fake
    engine answers 500, and the real path's 400 quotes transformers' internals."""
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    async with running(make_app(FakeEngine(), chat_template=str(template))) as app, raw(app) as http:
        body = {"model": M, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {name: 1}}
        r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text
    assert "apply_chat_template" not in r.text and "render_jinja_template" not in r.text


# --- structured outputs ---------------------------------------------------------------------------


# A Lark grammar of a chain of rules, each referring to the next: under MAX_GRAMMAR_CHARS.
_CHAIN_CHILD = """
import asyncio, json, sys
from chatgate.engines.fake import FakeEngine
from tests.support.app import make_app, raw, running

n = 2900
grammar = "start: r0\\n" + "\\n".join(f'r{i}: "x" r{i + 1} | "z"' for i in range(n)) + f'\\nr{n}: "y"'
assert len(grammar) < 64 * 1024

async def main() -> None:
    async with running(make_app(FakeEngine())) as app, raw(app) as http:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "grammar": grammar}
        r = await http.post("/v1/chat/completions", json=body)
        print(r.status_code, json.dumps(r.json()))

asyncio.run(main())
"""


def test_a_long_chain_of_grammar_rules_is_a_400_not_a_crash_of_the_server() -> None:
    """The door's grammar check (llguidance, in a worker thread of the API server) recurses
    once per rule of a chain: ~2,800 rules (61 KB, under the 64 KB cap) overflow the thread's
    stack and the whole API server process dies with SIGSEGV: one request takes down every
    caller's streams. Run in a child process, since it kills its process."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}
    child = subprocess.run([sys.executable, "-c", _CHAIN_CHILD], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"the server process died (return code {child.returncode}): {child.stderr[-500:]}"
    status, body = child.stdout.strip().splitlines()[-1].split(" ", 1)
    assert status == "400" and json.loads(body)["error"]["param"] == "grammar", child.stdout


def test_a_json_schema_pattern_gets_the_slow_mask_trial_regexes_get(tokenizer: Any) -> None:
    """Regexes and grammars whose first mask is slow are refused by the worker's trial, but a
    JSON schema is compiled with no trial: `{"pattern": "^(a{1000}){1000}$"}` in a schema
    (also a tool's parameters) passes the door and the worker, and its first mask (~1.5 s on
    the default model's vocabulary) is computed in the scheduler's thread, stalling every
    sequence in the batch."""
    import time

    from chatgate.engines.constraints import TRIAL_SECONDS, ConstraintCompiler
    from chatgate.errors import InvalidRequestError

    compiler = ConstraintCompiler(tokenizer, len(tokenizer))
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a{1000}){1000}$"}}, "required": ["s"]}
    try:
        grammar = compiler.compile({"type": "json_schema", "schema": schema, "param": "response_format.json_schema.schema"})
    except InvalidRequestError as exc:
        assert exc.param == "response_format.json_schema.schema"
        return
    constraint = grammar.start()
    logits = __import__("torch").zeros(len(tokenizer))
    began = time.perf_counter()
    constraint.mask(logits, remaining=100)
    assert time.perf_counter() - began < TRIAL_SECONDS


def test_a_refused_regex_costs_the_worker_its_trial_once(tokenizer: Any) -> None:
    """The trial that refuses `(a{1000}){1000}` itself spends ~1.4 s of the worker's CPU, and
    refusals are not remembered: the same small body sent again and again costs that every
    time (rpm is the only bound), while the door's compile check lets it through each time."""
    import time

    from chatgate.engines.constraints import ConstraintCompiler
    from chatgate.errors import InvalidRequestError

    compiler = ConstraintCompiler(tokenizer, len(tokenizer))
    spec = {"type": "regex", "regex": "(a{1000}){1000}", "param": "guided_regex"}
    with pytest.raises(InvalidRequestError):
        compiler.compile(spec)
    began = time.perf_counter()
    with pytest.raises(InvalidRequestError):
        compiler.compile(dict(spec))
    assert time.perf_counter() - began < 0.1


# --- error dialects -------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/messages/batches"), ("GET", "/v1/messages/count_tokens")])
async def test_anthropic_paths_answer_in_anthropics_shape(fake_app: Any, method: str, path: str) -> None:
    """Anthropic's SDK calls `/v1/messages/batches` (and may get a method wrong); the answer
    should be Anthropic's error shape, not OpenAI's, as it is for `/v1/messages` itself."""
    async with raw(fake_app) as http:
        r = await http.request(method, path, content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code in (404, 405)
    assert r.json().get("type") == "error" and set(r.json()["error"]) == {"type", "message"}, r.text


async def test_a_messages_request_past_its_deadline_is_anthropics_timeout_error() -> None:
    """Anthropic says a 504 as `timeout_error`; the dialect had it as `api_error`."""
    async with running(make_app(FakeEngine(token_delay=0.05))) as app, raw(app) as http:
        body = {"model": M, "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]}
        r = await http.post("/v1/messages", json=body, headers={"x-request-timeout": "0.3"})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error", r.text


# --- Kubernetes manifests -------------------------------------------------------------------------

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def _documents() -> list[dict[str, Any]]:
    import yaml

    return [d for f in sorted(MANIFESTS.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def test_every_pod_runs_unprivileged() -> None:
    """No pod sets a securityContext and the image has no USER: every container (the API server
    facing clients, the workers running model code) runs as root with privilege escalation
    allowed and a service-account token mounted."""
    for doc in _documents():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        name = doc["metadata"]["name"]
        assert (pod.get("securityContext") or {}).get("runAsNonRoot") is True, name
        assert pod.get("automountServiceAccountToken") is False, name
        for container in pod["containers"]:
            context = container.get("securityContext") or {}
            assert context.get("allowPrivilegeEscalation") is False, (name, container["name"])


def test_redis_is_reachable_only_by_the_api_servers() -> None:
    """Redis holds every key's rpm/tpm counters with no password: without a NetworkPolicy any
    pod in the cluster can FLUSHALL (resetting every budget) or fill another key's counters."""
    policies = [d for d in _documents() if d["kind"] == "NetworkPolicy"]
    guarded = [p for p in policies if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "chatgate-redis"]
    assert guarded, "no NetworkPolicy selects chatgate-redis"

