"""A live fleet for fault tests: a controller, fake-engine workers and API servers as real
processes on free ports, optionally with a fleet key and HTTPS between them."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.processes import Process, free_port

M = "fake-model"


@dataclass
class Tls:
    """A trustme CA and one certificate for 127.0.0.1, written as PEM files."""

    ca: str
    key: str
    cert: str

    @classmethod
    def make(cls, directory: Path) -> Tls:
        import trustme

        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        paths = cls(ca=str(directory / "ca.pem"), key=str(directory / "key.pem"), cert=str(directory / "cert.pem"))
        ca.cert_pem.write_to_path(paths.ca)
        leaf.private_key_pem.write_to_path(paths.key)
        leaf.cert_chain_pems[0].write_to_path(paths.cert)
        return paths


@dataclass
class LiveFleet:
    """Starts and stops the fleet's processes; `url[name]` is where each one listens."""

    logs: Path
    key: str | None = None
    tls: Tls | None = None
    heartbeat: float = 1.0
    processes: dict[str, Process] = field(default_factory=dict)
    url: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def _address(self, name: str) -> str:
        if name not in self.ports:
            self.ports[name] = free_port()
        scheme = "https" if self.tls and not name.startswith("api") else "http"
        self.url[name] = f"{scheme}://127.0.0.1:{self.ports[name]}"
        return self.url[name]

    def _fleet_args(self, *, serves_tls: bool) -> list[str]:
        args = ["--fleet-key", self.key] if self.key else []
        if self.tls:
            args += ["--fleet-ca-bundle", self.tls.ca]
            if serves_tls:
                args += ["--ssl-keyfile", self.tls.key, "--ssl-certfile", self.tls.cert]
        return args

    def _start(self, name: str, args: list[str]) -> Process:
        if name in self.processes:  # a restart: the old process is gone (or going)
            self.processes[name].stop()
        process = Process(args, self.logs / f"{name}-{int(time.monotonic() * 1000)}.log")
        self.processes[name] = process
        process.wait_healthy(self.url[name], verify=self.tls.ca if self.tls and not name.startswith("api") else True)
        return process

    def controller(self, *extra: str) -> Process:
        self._address("controller")
        return self._start("controller", ["controller", "--host", "127.0.0.1", "--port", str(self.ports["controller"]),
                                          "--heartbeat-expiration", str(3 * self.heartbeat),
                                          *self._fleet_args(serves_tls=True), *extra])

    def worker(self, name: str, *extra: str, delay: float = 0.02) -> Process:
        self._address(name)
        return self._start(name, ["worker", "--engine", "fake", "--fake-token-delay", str(delay), "--model-names", M,
                                  "--host", "127.0.0.1", "--port", str(self.ports[name]),
                                  "--controller-address", self.url["controller"],
                                  "--heartbeat-interval", str(self.heartbeat), *self._fleet_args(serves_tls=True), *extra])

    def api(self, name: str = "api", *extra: str, refresh: str | None = "0.5") -> Process:
        """An API server; `refresh=None` keeps the default worker table refresh."""
        self._address(name)
        refreshing = ["--worker-table-refresh", refresh] if refresh else []
        return self._start(name, ["api", "--host", "127.0.0.1", "--port", str(self.ports[name]),
                                  "--controller-address", self.url["controller"], *refreshing,
                                  *self._fleet_args(serves_tls=False), *extra])

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self) -> httpx.Client:
        """A raw client that trusts the fleet's CA and sends no key."""
        return httpx.Client(verify=self.tls.ca if self.tls else True, timeout=5)

    def table(self) -> list[str]:
        """Worker addresses in the controller's table."""
        with self.client() as http:
            workers = http.post(f"{self.url['controller']}/list_workers", headers=self.auth()).json()["workers"]
        return sorted(w["address"] for w in workers)

    def ready(self, name: str = "api") -> dict[str, object]:
        try:
            body: dict[str, object] = httpx.get(f"{self.url[name]}/ready", timeout=2).json()
            return body
        except (httpx.HTTPError, ValueError):
            return {}

    async def aready(self, *, want: dict[str, int], name: str = "api") -> bool:
        """Whether `/ready` counts `want` workers per model (without blocking the loop)."""
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                return bool((await http.get(f"{self.url[name]}/ready")).json().get("workers") == want)
        except (httpx.HTTPError, ValueError):
            return False

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()


async def streamed_chats(url: str, body: dict[str, Any], count: int, concurrency: int = 6) -> list[int]:
    """Statuses of `count` streamed chats of `body`, `concurrency` at a time; a stream counts as
    200 only if it ends in [DONE] with no error before it (else -1)."""
    limit = asyncio.Semaphore(concurrency)

    async def one(http: httpx.AsyncClient) -> int:
        async with limit, http.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as response:
            lines = [line async for line in response.aiter_lines() if line]
            return response.status_code if lines and lines[-1] == "data: [DONE]" and "error" not in lines[-2] else -1

    async with httpx.AsyncClient(timeout=300) as http:
        return list(await asyncio.gather(*(one(http) for _ in range(count))))
