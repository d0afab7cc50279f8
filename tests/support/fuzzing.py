"""Generated requests for fuzzing the API (shared by the CI fuzz test, the live one and `make fuzz`).

`python -m tests.support.fuzzing --requests 10000` sends that many generated requests to the stack in one
process (`serve`, in-process transport) or, with `--three-process`, to a controller, a fake-engine
worker and an API server started as real processes; it prints counts by status and exits non-zero
on any 5xx, any hang, or if a normal chat does not answer afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

M = "fake-model"

# Text with lone UTF-16 surrogates now and then (JSON can escape them; UTF-8 cannot carry them).
texts = st.text(max_size=12) | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=6)
scalars = (
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.integers() | st.floats() | texts
)
anything = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot", ""])
tool_call = st.fixed_dictionaries(
    {}, optional={"id": texts | anything, "type": st.just("function") | anything,
                  "function": st.fixed_dictionaries({}, optional={"name": texts, "arguments": texts | anything}) | anything},
)
content = st.text(max_size=40) | texts | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": st.text(max_size=10)}), max_size=2) | anything
message = st.fixed_dictionaries(
    {"role": roles},
    optional={"content": content, "name": st.text(max_size=5), "tool_calls": st.lists(tool_call, max_size=2) | anything},
) | anything


def nested(depth: int) -> dict[str, Any]:
    """A JSON schema `depth` objects deep."""
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


schemas = anything | st.integers(1, 120).map(nested) | st.integers(0, 12_000).map(
    lambda n: {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)}}
)
grammars = texts | st.sampled_from(['root ::= "a" | "b"', "root ::= (", 'start: "a" | b', "root ::= [0-9]+", "%llguidance {}\nstart: /a/"])
many_messages = st.integers(2040, 2060).map(lambda n: [{"role": "user", "content": "x"}] * n)
numbers = st.floats(-5, 5) | st.integers(-5, 40) | anything
token_ids = st.lists(st.integers(-3, 300), max_size=6)
sampling: dict[str, Any] = {
    "model": st.sampled_from([M, M, M, "other", ""]) | anything,
    "n": st.integers(-1, 20) | anything,
    "temperature": numbers,
    "top_p": numbers,
    "top_k": numbers,
    "min_p": numbers,
    "presence_penalty": numbers,
    "frequency_penalty": numbers,
    "repetition_penalty": numbers | st.sampled_from([1e-300, 1e300, 0.009, 0.01, 100, 100.5]),
    "max_tokens": st.integers(-2, 3000) | anything,
    "seed": st.integers() | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1]) | anything,
    "stop": texts | st.lists(st.text(max_size=3), max_size=6) | st.integers(250, 260).map(lambda n: ["s" * n]) | anything,
    "stream": st.booleans() | anything,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | anything,
    "logit_bias": st.dictionaries(texts | st.integers(0, 300).map(str) | st.integers(0, 2**70).map(str), numbers, max_size=3)
    | st.integers(295, 305).map(lambda n: {str(i): 1 for i in range(n)}) | anything,
    "unknown_field": anything,
    # Structured output beyond response_format (vLLM's and llama.cpp's fields).
    "structured_outputs": st.fixed_dictionaries({}, optional={
        "regex": texts | st.sampled_from(["(", r"\d{3}", "a{2,1}", "(a{1000}){1000}"]) | anything,
        "choice": st.lists(texts, max_size=3) | anything, "grammar": grammars | anything,
        "json": schemas | texts | anything, "json_object": st.booleans() | anything, "structural_tag": anything,
        "disable_fallback": anything}) | anything,
    "guided_regex": texts | anything,
    "guided_choice": st.lists(texts, max_size=3) | anything,
    "guided_grammar": grammars | anything,
    "guided_json": schemas | texts | anything,
    "guided_decoding_backend": texts | anything,
    "grammar": grammars | anything,
    "json_schema": schemas | anything,
    # OpenAI fields accepted as hints, or refused at values the server cannot honour.
    "service_tier": st.sampled_from(["auto", "default", "flex", "x"]) | anything,
    "metadata": st.dictionaries(texts, texts, max_size=3) | anything,
    "store": st.booleans() | anything,
    "prediction": anything, "modalities": anything, "audio": anything, "verbosity": anything,
    "suffix": texts | anything, "best_of": numbers,
}
chat_body = st.fixed_dictionaries({"model": sampling["model"], "messages": st.lists(message, max_size=3) | many_messages | anything},
                                  optional={k: v for k, v in sampling.items() if k != "model"}
                                  | {"max_completion_tokens": numbers, "logprobs": st.booleans() | anything,
                                     "top_logprobs": st.integers(-1, 25) | anything,
                                     "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "x"])},
                                                                               optional={"json_schema": st.fixed_dictionaries({"name": st.just("s"), "schema": schemas})}) | anything,
                                     "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g", "bad name"])}, optional={"parameters": schemas})}), max_size=2)
                                     | st.integers(127, 130).map(lambda n: [{"type": "function", "function": {"name": f"f{i}"}} for i in range(n)]) | anything,
                                     "tool_choice": st.sampled_from(["none", "auto", "required"]) | anything,
                                     "functions": anything, "function_call": anything})
completion_body = st.fixed_dictionaries(
    {"model": sampling["model"], "prompt": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | token_ids | st.lists(token_ids, max_size=2) | anything},
    optional={k: v for k, v in sampling.items() if k != "model"} | {"echo": st.booleans() | anything, "logprobs": st.integers(-1, 7) | anything},
)
many_prompts = completion_body.map(lambda b: {**b, "prompt": ["p"] * 17, "n": 8})  # prompts × n over the cap
embedding_body = st.fixed_dictionaries(
    {"model": sampling["model"], "input": st.text(max_size=20) | st.lists(st.text(max_size=8), max_size=4) | token_ids | st.lists(token_ids, max_size=3) | anything},
    optional={"encoding_format": st.sampled_from(["float", "base64", "hex"]) | anything, "dimensions": st.integers(-1, 40) | anything, "user": anything},
)
check_item = st.fixed_dictionaries({"model": sampling["model"], "prompt": st.text(max_size=10) | texts | anything, "max_tokens": numbers})
token_check_body = st.fixed_dictionaries({"prompts": st.lists(check_item, max_size=3) | st.integers(126, 130).map(
    lambda n: [{"model": M, "prompt": "x", "max_tokens": 1}] * n) | anything})
# Bodies inside the schema, near its edges, so generation paths are fuzzed too, not only validation.
valid_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": st.text(max_size=40)})
valid_sampling: dict[str, Any] = {
    "n": st.integers(1, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "top_k": st.sampled_from([-1, 1, 5, 300]),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 3),
    "max_tokens": st.integers(1, 1100),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), min_size=1, max_size=4),
    "stream": st.booleans(),
    "logit_bias": st.dictionaries(st.integers(0, 400).map(str), st.floats(-100, 100), max_size=3),
    "logprobs": st.booleans(),
}
valid_chat = st.fixed_dictionaries({"model": st.just(M), "messages": st.lists(valid_message, min_size=1, max_size=3)},
                                   optional=valid_sampling | {"top_logprobs": st.integers(0, 20)})
valid_completion = st.fixed_dictionaries(
    {"model": st.just(M), "prompt": st.text(min_size=1, max_size=30) | st.lists(st.integers(0, 257), min_size=1, max_size=5)},
    optional={k: v for k, v in valid_sampling.items() if k != "logprobs"} | {"echo": st.booleans(), "logprobs": st.integers(0, 5)},
)
requests = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), valid_chat),
    st.tuples(st.just("/v1/completions"), valid_completion),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/api/v1/chat/completions"]), chat_body),
    st.tuples(st.just("/v1/completions"), completion_body | many_prompts),
    st.tuples(st.just("/api/v1/token_check"), token_check_body),
    st.tuples(st.sampled_from(["/v1/embeddings", f"/v1/engines/{M}/embeddings"]), embedding_body),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]), anything),
)


class Harness:
    """One HTTP client (in-process app or a URL) and one event loop shared by every example."""

    def __init__(self, url: str | None = None, timeout: float = 20.0) -> None:
        self.loop = asyncio.new_event_loop()
        self.timeout = timeout
        self._lifespan: Any = None
        if url is None:
            from chatgate.engines.fake import FakeEngine
            from tests.support.app import make_app, raw

            app = make_app(FakeEngine(context_length=1024), max_n=8)
            self._lifespan = app.router.lifespan_context(app)
            self.loop.run_until_complete(self._lifespan.__aenter__())
            self.http = raw(app)
        else:
            self.http = httpx.AsyncClient(base_url=url, timeout=timeout)
        self.statuses: Counter[int | str] = Counter()
        self.failures: list[str] = []

    def send(self, path: str, body: bytes) -> httpx.Response | None:
        """Send one request; a hang is counted and returns None."""
        request = self.http.post(path, content=body, headers={"content-type": "application/json"})
        try:
            response = self.loop.run_until_complete(asyncio.wait_for(request, timeout=self.timeout))
        except TimeoutError:
            self.statuses["hang"] += 1
            self.failures.append(f"hang: {path} {body[:200]!r}")
            return None
        self.statuses[response.status_code] += 1
        return response

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        if self._lifespan is not None:
            self.loop.run_until_complete(self._lifespan.__aexit__(None, None, None))
        self.loop.close()


def problem(response: httpx.Response) -> str | None:
    """What is wrong with a response to a fuzzed request, if anything."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json().get("error")
        if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
            return f"{response.status_code} without an OpenAI error: {response.text[:300]}"
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in response.text.split("\n\n") if e]
        if events[-1] != "data: [DONE]":
            return f"stream without [DONE]: {response.text[-300:]}"
    return None


def still_answers(harness: Harness) -> bool:
    """Whether a normal chat request still gets its answer."""
    body = {"model": M, "messages": [{"role": "user", "content": "still there?"}], "temperature": 0}
    response = harness.send("/v1/chat/completions", json.dumps(body).encode())
    return response is not None and response.status_code == 200 and bool(
        response.json()["choices"][0]["message"]["content"].startswith("Echo:")
    )


def fuzz(harness: Harness, count: int, budget: float) -> None:
    """Send `count` generated requests (stopping early once `budget` seconds have passed)."""
    end = time.monotonic() + budget

    @settings(max_examples=count, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(request=requests)
    def one(request: tuple[str, Any]) -> None:
        if time.monotonic() > end:
            return
        path, body = request
        response = harness.send(path, json.dumps(body, allow_nan=True).encode())
        wrong = problem(response) if response is not None else None
        if wrong is not None:
            harness.failures.append(f"{path}: {wrong}")

    one()


@contextlib.contextmanager
def three_processes(logs: Path) -> Iterator[str]:
    """A controller, a fake-engine worker and an API server as real processes; yields the API URL."""
    from tests.support.processes import Process, free_port

    ports = {name: free_port() for name in ("controller", "worker", "api")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    started = [
        Process(["controller", "--host", "127.0.0.1", "--port", str(ports["controller"])], logs / "controller.log"),
        Process(["worker", "--host", "127.0.0.1", "--port", str(ports["worker"]), "--engine", "fake",
                 "--controller-address", urls["controller"], "--heartbeat-interval", "1"], logs / "worker.log"),
        Process(["api", "--port", str(ports["api"]), "--controller-address", urls["controller"], "--max-n", "8"],
                logs / "api.log"),
    ]
    try:
        for name, process in zip(("controller", "worker", "api"), started, strict=True):
            process.wait_healthy(urls[name])
        deadline = time.monotonic() + 30
        while M not in httpx.get(f"{urls['api']}/v1/models").text:
            if time.monotonic() > deadline:
                raise RuntimeError("the worker never appeared behind the API server")
            time.sleep(0.2)
        yield urls["api"]
    finally:
        for process in reversed(started):
            process.stop()


def report(harness: Harness, took: float) -> bool:
    """Print counts by status; True when nothing failed."""
    counts = ", ".join(f"{status}: {n}" for status, n in sorted(harness.statuses.items(), key=str))
    print(f"{sum(harness.statuses.values())} requests in {took:.0f} s; by status: {counts}")
    for failure in harness.failures[:20]:
        print("FAIL", failure)
    answered = still_answers(harness)
    print("a normal chat afterwards:", "answered" if answered else "NOT ANSWERED")
    return not harness.failures and answered


def main() -> None:
    """`make fuzz`: many generated requests, counts by status, zero 5xx and zero hangs."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--budget", type=float, default=900.0, help="Seconds before stopping early.")
    parser.add_argument("--three-process", action="store_true", help="Fuzz controller + worker + api processes.")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = None
        if args.three_process:
            url = stack.enter_context(three_processes(Path(stack.enter_context(tempfile.TemporaryDirectory()))))
        harness = Harness(url)
        begin = time.monotonic()
        try:
            fuzz(harness, args.requests, args.budget)
            ok = report(harness, time.monotonic() - begin)
        finally:
            harness.close()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
