"""Property-based fuzzing of the API: thousands of generated requests, none may get a 5xx or hang."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from tests.support.fuzzing import Harness, problem, requests, still_answers


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests)
def test_no_request_gets_a_5xx_or_hangs(harness: Harness, request: tuple[str, Any]) -> None:
    path, body = request
    response = harness.send(path, json.dumps(body, allow_nan=True).encode())
    assert response is not None, f"hang: {path}"
    assert problem(response) is None, problem(response)


def test_server_still_answers_after_fuzzing(harness: Harness) -> None:
    if sum(harness.statuses.values()) < 1000:  # run alone: do the fuzzing this test follows
        test_no_request_gets_a_5xx_or_hangs(harness=harness)
    assert sum(harness.statuses.values()) >= 1000
    assert harness.statuses[200] >= 50, harness.statuses  # the fuzzer reaches real generations too
    assert still_answers(harness)
