"""Traces across three processes: a controller, a fake-engine worker and an API server, each
exporting over OTLP/HTTP to a small receiver in the test; one request is one trace whose spans
come from all three, parented across the process boundaries."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from tests.support.live_fleet import M, LiveFleet
from tests.support.polling import poll

pytestmark = pytest.mark.live

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
MARKER = "okapi-lantern-marker-4410"


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]
    events: tuple[str, ...]


class Receiver:
    """An OTLP/HTTP traces endpoint (POST /v1/traces, protobuf) keeping what it receives."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.bodies: list[bytes] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    receiver.bodies.append(body)
                    receiver.spans += spans_of(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _value(value: object) -> object:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]  # type: ignore[attr-defined]
    return getattr(value, kind) if kind else None


def spans_of(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(ReceivedSpan(
                    service=str(resource.get("service.name")), name=span.name, trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(), parent_id=span.parent_span_id.hex(),
                    attributes={a.key: _value(a.value) for a in span.attributes},
                    events=tuple(e.name for e in span.events),
                ))
    return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    otlp = Receiver()
    yield otlp
    otlp.close()


def test_one_trace_spans_api_controller_and_worker(tmp_path: Path, receiver: Receiver) -> None:
    fleet = LiveFleet(tmp_path)
    otlp = ("--otlp-endpoint", receiver.url)  # a base URL: /v1/traces is added
    try:
        fleet.controller(*otlp)
        # The API server starts before the worker and refreshes its table rarely: the request's
        # own table refresh (a miss) is the controller call inside the trace.
        fleet.api("api", *otlp, refresh="3600")
        fleet.worker("w1", *otlp)
        poll(lambda: len(fleet.table()) == 1, what="worker registered", timeout=20)
        reply = httpx.post(
            f"{fleet.url['api']}/v1/chat/completions",
            json={"model": M, "messages": [{"role": "user", "content": MARKER}], "max_tokens": 64, "temperature": 0},
            headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"}, timeout=30,
        )
        assert reply.status_code == 200, reply.text
        assert MARKER in reply.json()["choices"][0]["message"]["content"]
    finally:
        fleet.stop()  # SIGTERM: each process flushes its batched spans as it shuts down
    spans = [s for s in receiver.spans if s.trace_id == TRACE_ID]
    by_id = {s.span_id: s for s in spans}
    services = {s.service for s in spans}
    assert services == {"chatgate-api", "chatgate-controller", "chatgate-worker"}, [(s.service, s.name) for s in spans]

    (server,) = [s for s in spans if s.service == "chatgate-api" and s.name == "POST /v1/chat/completions"]
    assert server.parent_id == CLIENT_SPAN
    assert server.attributes["gen_ai.request.model"] == M and server.attributes["gen_ai.operation.name"] == "chat"
    usage = reply.json()["usage"]
    assert server.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    # The controller's span hangs under the API server's call to it.
    (controller,) = [s for s in spans if s.service == "chatgate-controller"]
    call = by_id[controller.parent_id]
    assert call.service == "chatgate-api" and call.name == "chatgate.controller list_workers"
    # The worker's generation hangs under the attempt that reached it, through its server span.
    (generate_server,) = [s for s in spans if s.service == "chatgate-worker" and s.name == "POST /worker_generate_stream"]
    attempt = by_id[generate_server.parent_id]
    assert attempt.service == "chatgate-api" and attempt.name == "chatgate.attempt"
    (generate,) = [s for s in spans if s.service == "chatgate-worker" and s.name == f"chat {M}"]
    assert generate.parent_id == generate_server.span_id
    assert generate.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert generate.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    worker_phases = {s.name for s in spans if s.parent_id == generate.span_id}
    assert {"chatgate.tokenize", "chatgate.queue", "chatgate.prefill", "chatgate.decode"} <= worker_phases
    # Heartbeats and background table refreshes made no traces; no span carries the prompt.
    assert all(s.trace_id == TRACE_ID for s in receiver.spans if s.service == "chatgate-controller")
    assert not any(MARKER.encode() in body for body in receiver.bodies)
