"""Traces: one trace per request, across the API server, the controller and the worker.

OpenTelemetry, written by hand: each app gets a `Tracing` (its tracer, or none) when it is built,
from a `TracerProvider` its factory is given (tests: an in-memory exporter) or one built from
`--otlp-endpoint` / the standard `OTEL_EXPORTER_OTLP_*` variables (batched OTLP/HTTP export,
flushed when the app shuts down). With neither, tracing is off and costs a context variable
read per span site.

`TraceMiddleware` opens a request's server span (its parent the caller's W3C `traceparent`)
and makes the app's tracer current for the request; code below adds children with `span()`
(current inside its block) or `start_span()` (for a span that lives across the yields of a
stream, ended by its owner). `inject` puts the current span's `traceparent` on outgoing calls
(the fleet's and an upstream engine's HTTP clients), so the worker's and the controller's spans
join the API server's trace. With tracing off the caller's own `traceparent` is still passed on.

Attributes follow OpenTelemetry's GenAI conventions (`gen_ai.*`); prompt and completion text
never go into a span, and failures are recorded by type (`error.type`), never by message.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatgate.engines.base import GenerationOutput
from chatgate.protocol.worker import GenerateParams

log = logging.getLogger(__name__)

SERVICE_API = "chatgate-api"
SERVICE_CONTROLLER = "chatgate-controller"
SERVICE_WORKER = "chatgate-worker"

# Probes and scrapes arrive every few seconds: never a trace of their own.
UNTRACED_PATHS = frozenset({"/health", "/ready", "/metrics"})

_PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent only, whatever OTEL_PROPAGATORS says
_NOT_TRACED: contextlib.nullcontext[None] = contextlib.nullcontext()

# The tracer of the request being served; None outside a traced request (or with tracing off).
_tracer: ContextVar[Tracer | None] = ContextVar("chatgate_tracer", default=None)


@dataclass
class _Served:
    """A traced request's server span and the generation totals its choices add up to."""

    span: Span
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)


# Mutable, so totals added by a child task (a streaming body) land on the one request.
_served: ContextVar[_Served | None] = ContextVar("chatgate_served", default=None)

Attributes = Mapping[str, AttributeValue]


def traces_endpoint(setting: str | None) -> str | None:
    """Where traces go: `--otlp-endpoint` (a base URL gets `/v1/traces`), else
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (as is), else OTEL_EXPORTER_OTLP_ENDPOINT (a base URL);
    None when none is set: tracing is off."""
    if setting:
        return _signal_url(setting)
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return _signal_url(base) if base else None


def _signal_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1/traces") else url + "/v1/traces"


def exporting_provider(endpoint: str, service: str) -> TracerProvider:
    """An SDK provider sending spans of `service` to `endpoint` in batches (OTLP/HTTP protobuf)."""
    # Imported here: a process with tracing off never loads the SDK or the exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME, if the operator set one, names the process; OTEL_RESOURCE_ATTRIBUTES and
    # OTEL_TRACES_SAMPLER apply as the SDK reads them.
    name = os.environ.get("OTEL_SERVICE_NAME") or service
    provider = SdkTracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


@dataclass(frozen=True)
class Tracing:
    """One app's tracing: its tracer (None: off), and the provider it owns and shuts down."""

    tracer: Tracer | None = None
    owned: TracerProvider | None = None

    @classmethod
    def of(cls, *, service: str, endpoint: str | None, provider: TracerProvider | None = None) -> Tracing:
        """The tracing of an app of `service`: to `provider` if given (the caller owns it), else
        exporting to `--otlp-endpoint` or the OTEL variables, else off."""
        if provider is not None:
            return cls(tracer=provider.get_tracer("chatgate"))
        url = traces_endpoint(endpoint)
        if url is None:
            return cls()
        owned = exporting_provider(url, service)
        log.info("sending traces of %s to %s", service, url)
        return cls(tracer=owned.get_tracer("chatgate"), owned=owned)

    def close(self) -> None:
        """Flush and stop the provider this app built (blocking: call it from a thread)."""
        shutdown: Callable[[], None] | None = getattr(self.owned, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}


class TraceMiddleware:
    """Opens each request's server span under the caller's `traceparent`; with `require_parent`
    (the controller) only a request that arrives as part of a trace gets one, so heartbeats and
    table refreshes make no traces of their own."""

    def __init__(self, app: ASGIApp, *, tracing: Tracing, require_parent: bool = False) -> None:
        self.app = app
        self.tracer = tracing.tracer
        self.require_parent = require_parent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parent = _PROPAGATOR.extract(_headers(scope))
        # Attached even when not traced: the caller's traceparent then goes on to the workers.
        attached = otel_context.attach(parent)
        try:
            joined = trace.get_current_span(parent).get_span_context().is_valid
            if self.tracer is None or scope["path"] in UNTRACED_PATHS or (self.require_parent and not joined):
                await self.app(scope, receive, send)
            else:
                await self._traced(self.tracer, scope, receive, send)
        finally:
            otel_context.detach(attached)

    async def _traced(self, tracer: Tracer, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = str(scope.get("method", "")), str(scope.get("path", ""))
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        attributes = {"http.request.method": method, "url.path": path[:256]}
        # Named by the route once it is known (a client's path would make names without bound).
        with tracer.start_as_current_span(
            method, kind=SpanKind.SERVER, attributes=attributes,
            record_exception=False, set_status_on_exception=False,
        ) as server:
            held, serving = _tracer.set(tracer), _served.set(_Served(server))
            try:
                await self.app(scope, receive, send_status)
            except BaseException as exc:
                failed(server, exc)
                raise
            finally:
                _tracer.reset(held)
                _served.reset(serving)
                route = getattr(scope.get("route"), "path", None)
                if route:
                    server.update_name(f"{method} {route}")
                    server.set_attribute("http.route", route)
                server.set_attribute("http.response.status_code", status)
                if status >= 500:
                    server.set_status(Status(StatusCode.ERROR))


def failed(span: Span, exc: BaseException) -> None:
    """Mark `span` failed by the error's type only (a message may quote the request)."""
    span.set_attribute("error.type", type(exc).__name__)
    span.set_status(Status(StatusCode.ERROR))


def traced() -> bool:
    """Whether the current request is traced (a span made now would be recorded)."""
    return _tracer.get() is not None


@contextlib.contextmanager
def span(
    name: str, attributes: Attributes | None = None, *, kind: SpanKind = SpanKind.INTERNAL, parent: Span | None = None
) -> Iterator[Span]:
    """A child of `parent` (or of the current span), current inside the block (a no-op outside
    a traced request). Not for a block that yields a stream: see `start_span`."""
    tracer = _tracer.get()
    if tracer is None:
        yield trace.INVALID_SPAN
        return
    where = trace.set_span_in_context(parent) if parent is not None else None
    with tracer.start_as_current_span(
        name, context=where, kind=kind, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as child:
        try:
            yield child
        except BaseException as exc:
            failed(child, exc)
            raise


def start_span(name: str, attributes: Attributes | None = None, *, parent: Span | None = None) -> Span:
    """A child of `parent` (or of the current span), not made current: for a span that lives
    across a stream's yields, which resume in other contexts. Its owner ends it."""
    tracer = _tracer.get()
    if tracer is None:
        return trace.INVALID_SPAN
    where = trace.set_span_in_context(parent) if parent is not None else None
    return tracer.start_span(name, context=where, attributes=attributes, record_exception=False)


def current(of: Span) -> contextlib.AbstractContextManager[Any]:
    """Make `of` the current span inside the block (nothing for a span that is not recorded)."""
    if not of.is_recording():
        return _NOT_TRACED
    return trace.use_span(of, end_on_exit=False, record_exception=False, set_status_on_exception=False)


def timed_child(parent: Span, name: str, start_ns: int, end_ns: int, attributes: Attributes | None = None) -> None:
    """Record a finished child of `parent` from times measured elsewhere (the engine's thread)."""
    tracer = _tracer.get()
    if tracer is None or not parent.is_recording():
        return
    child = tracer.start_span(name, context=trace.set_span_in_context(parent), attributes=attributes, start_time=start_ns)
    child.end(end_time=max(end_ns, start_ns))


def current_span() -> Span:
    """The current span (a non-recording one outside a traced request)."""
    return trace.get_current_span()


def trace_id() -> str | None:
    """The current trace's id as 32 hex digits: this request's span's, or with tracing off the
    caller's `traceparent`'s; None outside a trace."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def traceparent() -> dict[str, str]:
    """The W3C headers that carry the current span to another process (empty outside a trace)."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        _PROPAGATOR.inject(carrier)
    return carrier


async def inject(request: httpx.Request) -> None:
    """httpx request hook: an outgoing call carries the current span as its `traceparent`."""
    for name, value in traceparent().items():
        request.headers[name] = value


HTTPX_HOOKS: dict[str, list[Callable[[httpx.Request], Any]]] = {"request": [inject]}
"""The event hooks of an HTTP client whose calls should join the caller's trace."""


def start_generation(params: GenerateParams) -> Span:
    """A worker's span for one generation, named as GenAI spans are (`chat <model>`), not made
    current; a non-recording one outside a traced request. Its owner ends it."""
    if _tracer.get() is None:
        return trace.INVALID_SPAN
    attributes = genai_generation(params)
    return start_span(f"{operation_of(params)} {params.model}", attributes)


def operation_of(params: GenerateParams) -> str:
    """The GenAI operation a generation is: a chat when it has messages, else a text completion."""
    return "chat" if params.messages is not None or params.tool_messages is not None else "text_completion"


def genai_generation(params: GenerateParams) -> dict[str, AttributeValue]:
    """GenAI attributes of a generation's parameters."""
    knobs = {
        "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else None, "seed": params.seed,
        "frequency_penalty": params.frequency_penalty, "presence_penalty": params.presence_penalty,
    }
    return genai_request(operation_of(params), params.model, knobs)


def genai_request(operation: str, model: str, knobs: Mapping[str, Any]) -> dict[str, AttributeValue]:
    """GenAI attributes of a request: operation, model, and the sampling knobs that were set."""
    attributes: dict[str, AttributeValue] = {"gen_ai.operation.name": operation, "gen_ai.request.model": model}
    for knob in ("max_tokens", "temperature", "top_p", "top_k", "seed", "frequency_penalty", "presence_penalty"):
        value = knobs.get(knob)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attributes[f"gen_ai.request.{knob}"] = value
    return attributes


def genai_usage(span: Span, *, input_tokens: int, output_tokens: int, finish_reasons: Sequence[str]) -> None:
    """Set a generation's token counts and finish reasons on `span`."""
    if not span.is_recording():
        return
    span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
    if finish_reasons:
        span.set_attribute("gen_ai.response.finish_reasons", list(finish_reasons))


def generation_end(span: Span, output: GenerationOutput, finish_reason: str | None) -> None:
    """Close a worker's generation span's story: usage, finish reason, and the engine's phases
    as child spans (queue wait, prefill up to the first token, decode), when it reports them."""
    if not span.is_recording():
        return
    genai_usage(
        span, input_tokens=output.prompt_tokens, output_tokens=output.completion_tokens,
        finish_reasons=[finish_reason] if finish_reason else [],
    )
    phases = output.phases
    if phases is None:
        return
    span.set_attribute("chatgate.preemptions", phases.preemptions)
    started = phases.admitted or phases.finished
    timed_child(span, "chatgate.queue", phases.queued, started)
    if phases.admitted is not None:
        prefilled = phases.first_token or phases.finished
        timed_child(span, "chatgate.prefill", phases.admitted, prefilled, {"gen_ai.usage.input_tokens": output.prompt_tokens})
    if phases.first_token is not None:
        timed_child(span, "chatgate.decode", phases.first_token, phases.finished, {"gen_ai.usage.output_tokens": output.completion_tokens})


def request_usage(*, input_tokens: int, output_tokens: int, finish_reason: str | None) -> None:
    """Add one choice's tokens and finish reason to the request's server span (the API server
    answers several choices and prompts in one request)."""
    served = _served.get()
    if served is None:
        return
    served.input_tokens += input_tokens
    served.output_tokens += output_tokens
    if finish_reason:
        served.finish_reasons.append(finish_reason)
    genai_usage(
        served.span, input_tokens=served.input_tokens, output_tokens=served.output_tokens,
        finish_reasons=served.finish_reasons,
    )


def request_attributes(attributes: Attributes) -> None:
    """Describe the request on its server span (the GenAI request attributes)."""
    served = _served.get()
    if served is not None:
        served.span.set_attributes(attributes)
