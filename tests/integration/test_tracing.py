"""Traces in one process: the app's spans go to the tracer provider it was built with (here an
in-memory exporter), one trace per request under the client's `traceparent`, with the GenAI
attributes and never a prompt or a completion."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from chatgate.api.app import create_api_app
from chatgate.api.workers.base import PoolSource, Worker, WorkerPool
from chatgate.api.workers.local import LocalPool, local_pool
from chatgate.engines.base import Engine
from chatgate.engines.fake import FakeEngine
from chatgate.errors import WorkerUnavailableError
from chatgate.protocol import worker as wire
from chatgate.settings import ServeSettings
from tests.support.app import raw, running, sdk, user

pytestmark = pytest.mark.anyio

M = "fake-model"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
MARKER = "zebra-quartz-marker-7731"  # a prompt no span may carry (the fake engine echoes it back)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Spans finished by the app under test, kept in memory."""
    spans = InMemorySpanExporter()
    yield spans
    spans.clear()


def provider_for(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def traced_app(exporter: InMemorySpanExporter, workers: PoolSource | None = None, **settings: object) -> FastAPI:
    serve = ServeSettings(**settings)  # type: ignore[arg-type]
    pool = workers or local_pool(serve, engines=[FakeEngine()])
    return create_api_app(serve, pool, tracer_provider=provider_for(exporter))


def by_name(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name or s.name.startswith(name + " ")]


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = by_name(spans, name)
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def everything_said(spans: Sequence[ReadableSpan]) -> str:
    """Every name, attribute and event of the spans, as one text to search."""
    return json.dumps(
        [
            [s.name, dict(s.attributes or {}), [[e.name, dict(e.attributes or {})] for e in s.events], str(s.status.description)]
            for s in spans
        ],
        default=str,
    )


async def test_one_trace_per_request_under_the_clients_traceparent(exporter: InMemorySpanExporter) -> None:
    async with running(traced_app(exporter, api_keys=["sk-test"])) as app:
        reply = await sdk(app).chat.completions.with_raw_response.create(
            model=M, messages=user(MARKER), max_tokens=200, temperature=0, top_p=0.9,
            extra_headers={"traceparent": TRACEPARENT},
        )
    completion = reply.parse()
    assert completion.usage is not None and MARKER in (completion.choices[0].message.content or "")
    spans = exporter.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    server = one(spans, "POST /v1/chat/completions")
    assert server.kind == SpanKind.SERVER and parent_of(server) == int(PARENT_ID, 16)
    assert server.parent is not None and server.parent.is_remote
    ids = {s.context.span_id: s for s in spans}
    # The door's steps and the dispatch are the request's children; the attempt is the dispatch's.
    for name in ("chatgate.auth", "chatgate.validate", "chatgate.dispatch"):
        assert parent_of(one(spans, name)) == server.context.span_id, name
    attempt = one(spans, "chatgate.attempt")
    assert parent_of(attempt) == one(spans, "chatgate.dispatch").context.span_id
    assert attempt.attributes is not None and attempt.attributes["chatgate.attempt"] == 1
    # In one process the worker's spans are in the same trace, under the attempt.
    generate = one(spans, "chat")
    assert parent_of(generate) == attempt.context.span_id
    for name in ("chatgate.tokenize", "chatgate.queue", "chatgate.prefill", "chatgate.decode"):
        assert parent_of(one(spans, name)) == generate.context.span_id, name
    queue, prefill, decode = (one(spans, n) for n in ("chatgate.queue", "chatgate.prefill", "chatgate.decode"))
    assert queue.start_time is not None and decode.end_time is not None and prefill.start_time is not None
    assert queue.start_time <= prefill.start_time <= decode.end_time
    # Every span closes within its parent's time (the server span, the longest, covers them all).
    assert all(s.start_time and server.start_time and s.start_time >= server.start_time for s in spans)
    assert all(parent_of(s) in ids or s is server for s in spans)
    usage = completion.usage
    for span in (server, generate):
        attributes = dict(span.attributes or {})
        assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.request.model"] == M
        assert attributes["gen_ai.request.max_tokens"] == 200 and attributes["gen_ai.request.temperature"] == 0
        assert attributes["gen_ai.request.top_p"] == 0.9
        assert attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
        assert attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
        assert tuple(attributes["gen_ai.response.finish_reasons"]) == ("stop",)  # type: ignore[arg-type]
    assert dict(server.attributes or {})["http.response.status_code"] == 200
    assert MARKER not in everything_said(spans)


async def test_a_stream_is_one_trace_and_its_server_span_ends_with_it(exporter: InMemorySpanExporter) -> None:
    async with running(traced_app(exporter)) as app:
        stream = await sdk(app).completions.create(
            model=M, prompt=MARKER, max_tokens=100, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_headers={"traceparent": TRACEPARENT},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    usage = chunks[-1].usage
    assert MARKER in text and usage is not None
    spans = exporter.get_finished_spans()
    server = one(spans, "POST /v1/completions")
    generate = one(spans, f"text_completion {M}")
    assert {s.context.trace_id for s in spans} == {int(TRACE_ID, 16)}
    assert server.end_time is not None and generate.end_time is not None and generate.end_time <= server.end_time
    attributes = dict(server.attributes or {})
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens > 0
    assert MARKER not in everything_said(spans)


async def test_without_a_traceparent_each_request_starts_its_own_trace(
    exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatgate.access")
    async with running(traced_app(exporter)) as app:
        client = sdk(app)
        for _ in range(2):
            await client.chat.completions.create(model=M, messages=user("hi"), max_tokens=2)
        async with raw(app) as http:
            assert (await http.get("/health")).status_code == 200  # probes make no trace
            assert (await http.get("/v1/no-such-route-8812")).status_code == 404
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    # A path no route matched names no span: a client's paths would make names without bound.
    assert [s.name for s in roots] == ["POST /v1/chat/completions"] * 2 + ["GET"]
    assert len({s.context.trace_id for s in spans}) == 3
    # The access line names the trace its request's spans are in.
    logged = [r.access["trace_id"] for r in caplog.records if r.name == "chatgate.access"]  # type: ignore[attr-defined]
    assert logged == [format(s.context.trace_id, "032x") for s in roots]


async def test_a_refused_request_is_traced_with_its_status_and_no_prompt(exporter: InMemorySpanExporter) -> None:
    async with running(traced_app(exporter)) as app:
        async with raw(app) as http:
            bad = await http.post(
                "/v1/chat/completions", json={"model": M, "messages": user(MARKER), "temperature": 9},
                headers={"traceparent": TRACEPARENT},
            )
    assert bad.status_code == 400
    spans = exporter.get_finished_spans()
    server = one(spans, "POST /v1/chat/completions")
    validate = one(spans, "chatgate.validate")
    assert dict(server.attributes or {})["http.response.status_code"] == 400
    assert validate.status.status_code == StatusCode.ERROR
    assert dict(validate.attributes or {})["error.type"] == "InvalidRequestError"
    assert not by_name(spans, "chatgate.dispatch")
    assert MARKER not in everything_said(spans)


class Unreachable:
    """A worker that cannot be reached: the request fails over to the next one."""

    address = "http://unreachable"

    async def _refuse(self) -> AsyncIterator[wire.WorkerChunk]:
        raise WorkerUnavailableError("A worker of this model is unavailable.")
        yield  # an async generator, as a worker's stream is

    def generate_stream(self, params: wire.GenerateParams) -> AsyncIterator[wire.WorkerChunk]:
        return self._refuse()

    async def model_details(self) -> wire.ModelDetails:
        return wire.ModelDetails(context_length=2048)


class FirstUnreachable(LocalPool):
    """The in-process worker, behind one that is down and offered first."""

    async def worker_for(self, model: str, *, exclude: frozenset[str] = frozenset()) -> Worker:
        if Unreachable.address not in exclude:
            return Unreachable()  # type: ignore[return-value]
        return await super().worker_for(model, exclude=exclude - {Unreachable.address})


def failing_over(engine: FakeEngine) -> PoolSource:
    serve = ServeSettings()
    inner = local_pool(serve, engines=[engine])

    @contextlib.asynccontextmanager
    async def pool() -> AsyncIterator[WorkerPool]:
        async with inner() as opened:
            assert isinstance(opened, LocalPool)
            failover = FirstUnreachable([])
            failover.__dict__.update(opened.__dict__)
            yield failover

    return pool


async def test_a_failover_shows_both_attempts(exporter: InMemorySpanExporter) -> None:
    async with running(traced_app(exporter, failing_over(FakeEngine()))) as app:
        await sdk(app).chat.completions.create(
            model=M, messages=user(MARKER), max_tokens=3, extra_headers={"traceparent": TRACEPARENT}
        )
    spans = exporter.get_finished_spans()
    dispatch = one(spans, "chatgate.dispatch")
    attempts = sorted(by_name(spans, "chatgate.attempt"), key=lambda s: s.start_time or 0)
    assert len(attempts) == 2 and all(parent_of(a) == dispatch.context.span_id for a in attempts)
    first, second = (dict(a.attributes or {}) for a in attempts)
    assert (first["chatgate.attempt"], first["chatgate.worker"]) == (1, Unreachable.address)
    assert (second["chatgate.attempt"], second["chatgate.worker"]) == (2, "local")
    assert attempts[0].status.status_code == StatusCode.ERROR and first["error.type"] == "WorkerUnavailableError"
    assert attempts[1].status.status_code == StatusCode.UNSET
    assert parent_of(one(spans, "chat")) == attempts[1].context.span_id
    assert MARKER not in everything_said(spans)


async def test_with_tracing_off_the_clients_trace_id_is_still_logged_and_passed_on() -> None:
    """No provider and no endpoint: no spans at all, and the client's trace goes on unchanged."""
    seen: list[str] = []

    class Recording(FakeEngine):
        async def generate(self, prompt_ids, params):  # type: ignore[no-untyped-def]
            from chatgate import tracing

            seen.append(tracing.traceparent().get("traceparent", ""))
            async for out in super().generate(prompt_ids, params):
                yield out

    serve = ServeSettings()
    async with running(create_api_app(serve, local_pool(serve, engines=[Recording()]))) as app:
        await sdk(app).chat.completions.create(
            model=M, messages=user("hi"), max_tokens=2, extra_headers={"traceparent": TRACEPARENT}
        )
    assert seen == [TRACEPARENT]


class Upstream:
    """An OpenAI-compatible upstream on a real port: streams a short chat reply and keeps the
    `traceparent` of every request it gets."""

    def __init__(self) -> None:
        self.traceparents: list[str | None] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                upstream.traceparents.append(self.headers.get("traceparent"))
                events = [
                    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "hello"}, "finish_reason": None}]},
                    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
                ]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for event in events:
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


async def test_an_upstream_engine_gets_the_traceparent(exporter: InMemorySpanExporter) -> None:
    upstream = Upstream()
    try:
        serve = ServeSettings(
            engine="openai", upstream_url=upstream.url, model_names=["up-model"], max_model_len=4096,
            embedding_model_path="none",
        )
        app = create_api_app(serve, local_pool(serve), tracer_provider=provider_for(exporter))
        async with running(app):
            reply = await sdk(app).chat.completions.create(
                model="up-model", messages=user(MARKER), max_tokens=8, extra_headers={"traceparent": TRACEPARENT}
            )
    finally:
        upstream.close()
    assert reply.choices[0].message.content == "hello"
    (sent,) = upstream.traceparents
    assert sent is not None
    version, trace_id, parent_id, _ = sent.split("-")
    # The upstream's parent is a span of this trace, recorded here: the generation that called it.
    spans = {format(s.context.span_id, "016x"): s for s in exporter.get_finished_spans()}
    assert (version, trace_id) == ("00", TRACE_ID) and spans[parent_id].name == "chat up-model"
    attributes = dict(spans[parent_id].attributes or {})
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (3, 1)
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert MARKER not in everything_said(list(spans.values()))


@pytest.mark.model
async def test_our_engine_reports_queue_prefill_and_decode_on_every_runner(
    exporter: InMemorySpanExporter, chat_engine: Engine
) -> None:
    """The real default model: the scheduler's phases are child spans of the generation, in
    order, and two concurrent requests are two traces."""
    serve = ServeSettings()
    app = create_api_app(serve, local_pool(serve, engines=[chat_engine]), tracer_provider=provider_for(exporter))
    async with running(app):
        client = sdk(app)
        replies = await asyncio.gather(*(
            client.chat.completions.create(
                model=chat_engine.info.name, messages=user(f"{MARKER} Name a colour."), max_tokens=6, temperature=0,
            )
            for _ in range(2)
        ))
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 2
    for generate in by_name(spans, "chat"):
        children = {s.name: s for s in spans if parent_of(s) == generate.context.span_id}
        queue, prefill, decode = children["chatgate.queue"], children["chatgate.prefill"], children["chatgate.decode"]
        assert generate.start_time is not None and generate.end_time is not None
        assert queue.start_time is not None and queue.end_time is not None and prefill.end_time is not None
        assert generate.start_time <= queue.start_time <= queue.end_time == prefill.start_time
        assert prefill.end_time == decode.start_time and decode.end_time is not None
        assert decode.end_time <= generate.end_time
        attributes = dict(generate.attributes or {})
        assert attributes["gen_ai.usage.output_tokens"] in {r.usage.completion_tokens for r in replies if r.usage}
        assert dict(decode.attributes or {})["gen_ai.usage.output_tokens"] == attributes["gen_ai.usage.output_tokens"]
    assert len(by_name(spans, "chat")) == 2
    assert MARKER not in everything_said(spans)


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        f"00-{'0' * 32}-{PARENT_ID}-01",  # the all-zero trace id is invalid
        f"00-{TRACE_ID}-{PARENT_ID}-01" + "-x" * 4000,  # a huge header
        f"00-{TRACE_ID.upper()}-zzzzzzzzzzzzzzzz-01",
    ],
)
async def test_a_bad_traceparent_starts_a_new_trace(exporter: InMemorySpanExporter, traceparent: str) -> None:
    async with running(traced_app(exporter)) as app:
        async with raw(app) as http:
            reply = await http.post(
                "/v1/chat/completions", json={"model": M, "messages": user("hi"), "max_tokens": 2},
                headers={"traceparent": traceparent},
            )
    assert reply.status_code == 200
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.parent is None]
    assert root.name == "POST /v1/chat/completions" and len({s.context.trace_id for s in spans}) == 1
    assert format(root.context.trace_id, "032x") not in {TRACE_ID, "0" * 32}


async def test_limits_and_embeddings_are_traced(exporter: InMemorySpanExporter, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-limited": {"rpm": 1}}))
    async with running(traced_app(exporter, api_keys_file=keys)) as app:
        client = sdk(app, api_key="sk-limited")
        embedded = await client.embeddings.create(model=M, input=[MARKER, "two"])
        with pytest.raises(openai.RateLimitError):
            await client.embeddings.create(model=M, input=MARKER)
    spans = exporter.get_finished_spans()
    # The refused one was answered before routing: its span is named by the method alone.
    allowed, refused = sorted((s for s in spans if s.parent is None), key=lambda s: s.start_time or 0)
    assert (allowed.name, refused.name) == ("POST /v1/embeddings", "POST")
    assert dict(allowed.attributes or {})["gen_ai.operation.name"] == "embeddings"
    assert dict(allowed.attributes or {})["gen_ai.usage.input_tokens"] == embedded.usage.prompt_tokens
    assert dict(refused.attributes or {})["http.response.status_code"] == 429
    limits = {parent_of(s): dict(s.attributes or {}) for s in by_name(spans, "chatgate.limits")}
    assert limits[allowed.context.span_id].get("chatgate.limits.refused") is None
    assert limits[refused.context.span_id]["chatgate.limits.refused"] == "requests"
    assert MARKER not in everything_said(spans)
