"""A real `redis-server` on a free port for tests, that a test may stop and start again: with
append-only persistence, a restart keeps the data, as a Redis that was only unreachable would."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.polling import poll

REDIS = shutil.which("redis-server")


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One `redis-server` process (restartable on the same port and data folder)."""

    def __init__(self, folder: Path, *, password: str | None = None) -> None:
        if REDIS is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.folder = folder
        self.port = free_port()
        self.password = password
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        assert REDIS is not None
        args = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.folder),
                "--appendonly", "yes", "--appendfsync", "always"]
        if self.password is not None:  # as deploy/kubernetes/redis.yaml runs it
            args += ["--requirepass", self.password]
        process = self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def accepting() -> bool:
            assert process.poll() is None, "redis-server exited"
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True

        poll(accepting, what="redis-server accepting connections", timeout=20, ignore=(OSError,))

    def stop(self) -> None:
        """Stop the server (its data stays in the folder for the next `start`)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._process = None
