"""Real chatgate processes on free ports: start one, wait for it, read what it served, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.polling import poll

CHATGATE = [sys.executable, "-m", "chatgate.cli"]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_count(url: str, model: str, *, timeout: float = 1.0) -> int:
    """Workers the API server at `url` has for `model` (-1 when it cannot tell), for polling."""
    try:
        return int(httpx.get(f"{url}/ready", timeout=timeout).json()["workers"].get(model, 0))
    except (httpx.HTTPError, ValueError, KeyError):
        return -1


class Process:
    """A chatgate subcommand running in the background, its output kept in a log file."""

    def __init__(
        self, args: list[str], log: Path, env: dict[str, str] | None = None, *, command: list[str] | None = None,
        group: bool = False,
    ) -> None:
        """Start `chatgate args` (or `command args`, e.g. chatgate under another venv's Python);
        with `group`, in a process group of its own, so signals reach the children it spawns."""
        self.log = log
        self._file = log.open("wb")
        self._group = group
        self.proc = subprocess.Popen(
            [*(command or CHATGATE), *args], stdout=self._file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=group,
        )

    def signal(self, sig: int) -> None:
        """Send `sig` to the process (to its whole group, if it has one)."""
        try:
            if self._group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def wait_healthy(self, url: str, deadline: float = 120.0, verify: bool | str = True) -> None:
        """Poll `url`/health until it answers 200; fail with the log if the process dies."""

        def healthy() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"process exited early:\n{self.tail()}")
            return httpx.get(f"{url}/health", timeout=1.0, verify=verify).status_code == 200

        poll(healthy, what=f"{url} healthy", timeout=deadline, interval=0.2, ignore=(httpx.HTTPError,), details=self.tail)

    def tail(self) -> str:
        """The end of the process's log."""
        return self.log.read_text()[-3000:]

    def stop(self) -> None:
        """Terminate the process (SIGKILL after 15 s), and anything left in its group."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        if self._group:  # a killed vLLM server orphans its engine processes, ~3 GB each
            self.signal(signal.SIGKILL)
        self._file.close()


def requests_served_at(worker: str) -> float:
    """Requests the live worker at `worker` has served, from its `/metrics`."""
    text = httpx.get(f"{worker}/metrics", timeout=2).text
    line = next(x for x in text.splitlines() if x.startswith("chatgate_worker_requests_total"))
    return float(line.split()[-1])
