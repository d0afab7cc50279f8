"""`chatgate serve` and `chatgate worker` stop before loading anything when their models would
not fit in memory, naming the model and the sizes, without a traceback (as vLLM stops at start
naming memory)."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.processes import CHATGATE, free_port

pytestmark = [pytest.mark.live, pytest.mark.untimed]

# More memory kept free than any machine has: the check must refuse whatever the model needs.
HUGE_HEADROOM = ["--memory-headroom-gib", "1000000"]


@pytest.mark.parametrize("command", [
    ["serve", "--embedding-model-path", "none"],
    ["worker", "--controller-address", "http://127.0.0.1:9", "--no-register"],
])
def test_a_model_that_does_not_fit_stops_the_start_naming_it(command: list[str]) -> None:
    done = subprocess.run(
        [*CHATGATE, *command, "--port", str(free_port()), *HUGE_HEADROOM],
        capture_output=True, text=True, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-2000:]
    assert "chatgate: Loading the model `SmolLM2-135M-Instruct` requires more memory (" in done.stderr, output[-2000:]
    assert "1000000.00 GiB kept free by --memory-headroom-gib" in done.stderr and "than is available on cpu (" in done.stderr
    assert "--no-memory-check" in done.stderr
    assert "Traceback" not in output
