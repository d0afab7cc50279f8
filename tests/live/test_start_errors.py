"""A process that cannot start for a reason its operator can fix (a file it cannot make, a TLS
file that is not there) exits saying so in one line, without a traceback. A model that cannot load
is `test_multi_model_serve.py`'s, and memory `test_memory_startup.py`'s."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.processes import CHATGATE, free_port

pytestmark = [pytest.mark.live, pytest.mark.untimed]


def start(*args: str) -> tuple[int, str]:
    done = subprocess.run([*CHATGATE, *args, "--port", str(free_port())], capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_a_stored_responses_file_that_cannot_be_made_stops_the_api_server_naming_it() -> None:
    code, output = start("api", "--controller-address", "http://127.0.0.1:9", "--responses-path", "/proc/nope/r.sqlite3")
    assert code == 3, output[-2000:]  # uvicorn's start-up failure
    assert "could not start: cannot open the stored responses' file '/proc/nope/r.sqlite3' (--responses-path)" in output
    assert "Traceback" not in output, output[-2000:]


def test_a_missing_tls_file_stops_the_api_server_naming_it() -> None:
    code, output = start("api", "--controller-address", "http://127.0.0.1:9",
                         "--ssl-keyfile", "/no/such/key.pem", "--ssl-certfile", "/no/such/cert.pem")
    assert code == 3, output[-2000:]
    assert "chatgate: could not start: --ssl-keyfile '/no/such/key.pem' is not a readable file" in output, output[-2000:]
    assert "Traceback" not in output, output[-2000:]

