"""The generated requests of the fuzz test, against controller + worker + api processes: the API
server forwards what it accepts to the worker as JSON, and nothing may fail on the way."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fuzzing import Harness, fuzz, still_answers, three_processes

pytestmark = pytest.mark.live


def test_fuzzed_requests_in_three_process_mode(tmp_path: Path) -> None:
    with three_processes(tmp_path) as url:
        harness = Harness(url)
        try:
            fuzz(harness, 300, budget=240)
            assert not harness.failures, harness.failures[:5]
            assert sum(harness.statuses.values()) >= 100 and harness.statuses[200] >= 10, harness.statuses
            assert still_answers(harness)
        finally:
            harness.close()
