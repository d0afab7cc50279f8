"""Property-based tests generated from the API server's own OpenAPI schema (schemathesis): for every
route, generated requests, valid and not, with API keys on, never get a 5xx, and every response
matches what the schema says (status, content type, body).

`make fuzz` runs the same test at 10,000 examples in all (`CHATGATE_SCHEMA_EXAMPLES`, shared
evenly by the routes); CI runs 500.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks as schema_checks
from schemathesis.specs.openapi import checks as openapi_checks

from tests.support.processes import Process, free_port

pytestmark = [pytest.mark.live, pytest.mark.untimed]

EXAMPLES = int(os.environ.get("CHATGATE_SCHEMA_EXAMPLES", "500"))
KEY, ADMIN = "sk-fuzz", "sk-fuzz-admin"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = [
    schema_checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    """`chatgate serve` on the fake engine with a limited key, its docs on, and its schema."""
    logs = tmp_path_factory.mktemp("schema-fuzz")
    keys = logs / "keys.json"
    keys.write_text(json.dumps({KEY: {"name": "fuzz", "rpm": 1_000_000, "max_parallel_requests": 64}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Process(
        ["serve", "--engine", "fake", "--embedding-model-path", "none", "--port", str(port), "--docs",
         "--api-keys-file", str(keys), "--admin-keys", ADMIN, "--fake-token-delay", "0"],
        logs / "serve.log",
    )
    try:
        server.wait_healthy(url)
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=AUTH)
        schema.config.update(base_url=url)
        yield schema
    finally:
        server.stop()


def test_every_route_answers_as_its_schema_says(api_schema: schemathesis.BaseSchema) -> None:
    # Each operation in turn (schemathesis's own pytest plugin does not run under this pytest).
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    each = max(1, EXAMPLES // len(operations))

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=each, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def answers_as_declared(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=AUTH, timeout=60, checks=CHECKS)

        answers_as_declared()


def test_the_schema_covers_every_api_route(api_schema: schemathesis.BaseSchema) -> None:
    paths = set(api_schema.raw_schema["paths"])
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/tokenize",
                 "/detokenize", "/api/v1/token_check", "/api/v1/chat/completions", "/v1/models",
                 "/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel"):
        assert path in paths
