"""Where traces go (flag, standard variables, or nowhere), and what tracing off costs: no span,
no SDK, and the caller's traceparent passed on unchanged."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from pydantic import ValidationError

from chatgate import tracing
from chatgate.cli import parser
from chatgate.settings import ApiProcessSettings, ControllerSettings, ServeSettings, WorkerSettings
from chatgate.tracing import Tracing, traces_endpoint

OTEL = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME")


@pytest.fixture(autouse=True)
def no_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL:
        monkeypatch.delenv(name, raising=False)


def test_the_flag_wins_and_a_base_url_gets_the_traces_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318")
    assert traces_endpoint("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_endpoint("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_endpoint("https://c.example/v1/traces") == "https://c.example/v1/traces"


def test_the_standard_variables_when_no_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert traces_endpoint(None) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318")
    assert traces_endpoint(None) == "http://env:4318/v1/traces"
    # The per-signal variable is a full URL, used as it is, and wins over the base one.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:9999/custom")
    assert traces_endpoint(None) == "http://traces:9999/custom"


def test_every_serving_process_has_the_flag_and_refuses_a_bad_url() -> None:
    for command in ("serve", "api", "controller", "worker"):
        args = parser().parse_args([command, "--otlp-endpoint", "http://collector:4318"])
        assert args.otlp_endpoint == "http://collector:4318"
    for settings in (ServeSettings, ApiProcessSettings, ControllerSettings, WorkerSettings):
        assert settings(otlp_endpoint="http://c:4318").otlp_endpoint == "http://c:4318"
        with pytest.raises(ValidationError, match="http"):
            settings(otlp_endpoint="collector:4317")
        assert settings(otlp_endpoint="").otlp_endpoint is None


def test_off_means_no_tracer_and_spans_that_cost_nothing() -> None:
    off = Tracing.of(service=tracing.SERVICE_API, endpoint=None)
    assert off.tracer is None and off.owned is None
    off.close()
    with tracing.span("chatgate.anything") as span:
        assert not span.is_recording()
    assert not tracing.start_span("chatgate.anything").is_recording()
    assert tracing.traceparent() == {}  # nothing to pass on outside a trace


def test_an_endpoint_builds_an_exporting_provider_that_close_shuts_down() -> None:
    on = Tracing.of(service=tracing.SERVICE_WORKER, endpoint="http://127.0.0.1:9")
    assert on.tracer is not None and on.owned is not None
    resource = on.owned.resource  # type: ignore[attr-defined]
    assert resource.attributes["service.name"] == "chatgate-worker"
    on.close()  # nothing was recorded: nothing to send, and it returns at once


def test_otel_service_name_renames_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-eu-1")
    on = Tracing.of(service=tracing.SERVICE_API, endpoint="http://127.0.0.1:9")
    assert on.owned is not None and on.owned.resource.attributes["service.name"] == "gateway-eu-1"  # type: ignore[attr-defined]
    on.close()


def test_a_process_with_tracing_off_never_loads_the_sdk() -> None:
    code = (
        "import sys; from chatgate.settings import ApiProcessSettings;"
        "from chatgate.api.app import create_api_app; from chatgate.api.workers.controller import controller_pool;"
        "s = ApiProcessSettings(); create_api_app(s, controller_pool(s));"
        "print(any(m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter')) for m in sys.modules))"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr


async def test_the_httpx_hook_sends_the_current_span_as_traceparent() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("traceparent"))
        return httpx.Response(200)

    tracer = TracerProvider().get_tracer("test")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), event_hooks=tracing.HTTPX_HOOKS) as http:
        await http.get("http://worker/")  # outside a trace: no header
        with tracer.start_as_current_span("request") as span:
            await http.get("http://worker/")
    context = span.get_span_context()
    assert seen == [None, f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"]


pytestmark = pytest.mark.anyio
