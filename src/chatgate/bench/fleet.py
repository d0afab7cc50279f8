"""A fleet of real chatgate processes on free ports (controller, fake-engine workers, API
server) that a driver can kill, restart and measure: what `chatgate soak` runs."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MODEL = "fake-model"
CHATGATE = [sys.executable, "-m", "chatgate.cli"]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (Linux), or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Member:
    """One process of the fleet: its role name, arguments, port and the running process."""

    name: str
    args: list[str]
    port: int
    logs: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    generation: int = 0

    @property
    def url(self) -> str:
        """Where it listens."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self, deadline: float = 120.0) -> None:
        """Start it and wait until `/health` answers."""
        self.generation += 1
        log = (self.logs / f"{self.name}.{self.generation}.log").open("wb")
        self.proc = subprocess.Popen([*CHATGATE, *self.args], stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child has its own copy of the descriptor
        self.started = time.monotonic()
        async with httpx.AsyncClient(timeout=1.0) as http:
            end = time.monotonic() + deadline
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited early (see {self.logs})")
                try:
                    if (await http.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} not healthy within {deadline}s")

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def rss(self) -> int | None:
        """Its resident memory now."""
        return rss_bytes(self.proc.pid) if self.proc is not None and self.proc.poll() is None else None


@dataclass
class Fleet:
    """Controller, `workers` fake-engine workers and an API server."""

    logs: Path
    workers: int = 2
    token_delay: float = 0.01
    heartbeat: float = 2.0
    members: dict[str, Member] = field(default_factory=dict)

    def __post_init__(self) -> None:
        controller = self._member("controller", ["controller", "--heartbeat-expiration", str(3 * self.heartbeat)])
        for i in range(1, self.workers + 1):
            self._member(f"worker{i}", [
                "worker", "--engine", "fake", "--fake-token-delay", str(self.token_delay), "--model-names", MODEL,
                "--controller-address", controller.url, "--heartbeat-interval", str(self.heartbeat),
            ])
        self._member("api", ["api", "--controller-address", controller.url, "--worker-table-refresh", "0.5",
                             "--worker-first-frame-timeout", "10", "--worker-frame-timeout", "10"])

    def _member(self, name: str, args: list[str]) -> Member:
        port = free_port()
        member = Member(name=name, args=[*args, "--host", "127.0.0.1", "--port", str(port)], port=port, logs=self.logs)
        self.members[name] = member
        return member

    @property
    def api(self) -> Member:
        """The API server."""
        return self.members["api"]

    async def start(self) -> None:
        """Start every member, controller first, and wait until the API sees every worker."""
        for member in self.members.values():
            await member.start()
        async with httpx.AsyncClient(timeout=2.0) as http:
            end = time.monotonic() + 30
            while time.monotonic() < end:
                ready = (await http.get(f"{self.api.url}/ready")).json()
                if ready.get("workers", {}).get(MODEL) == self.workers:
                    return
                await asyncio.sleep(0.2)
        raise RuntimeError("the API server never saw every worker")

    def stop(self) -> None:
        """Stop every member, API server first."""
        for member in reversed(list(self.members.values())):
            member.stop()
