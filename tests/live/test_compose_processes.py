"""The compose topology, run as plain processes with the compose file's own commands: a controller,
two workers on the real default model and an API server, each started once what it depends on
is healthy (no container runtime on these machines; service names become 127.0.0.1 and each
port a free one)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.polling import poll
from tests.support.processes import CHATGATE, Process, free_port

pytestmark = [pytest.mark.live, pytest.mark.model, pytest.mark.untimed]

ROOT = Path(__file__).resolve().parents[2]


def _ordered(services: dict[str, Any]) -> list[str]:
    """Service names, each after what it depends on."""
    done: list[str] = []
    while len(done) < len(services):
        for name, service in services.items():
            if name not in done and all(dependency in done for dependency in service.get("depends_on", {})):
                done.append(name)
    return done


def test_compose_topology_serves_as_plain_processes(tmp_path: Path) -> None:
    services: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    ports: dict[str, int] = {}

    def local(arg: str) -> str:
        """A compose argument with service names as 127.0.0.1 and compose ports as free ones."""
        for port in re.findall(r"\b(2100\d|8000)\b", arg):
            ports.setdefault(port, free_port())
            arg = arg.replace(port, str(ports[port]))
        return re.sub(r"//(" + "|".join(map(re.escape, services)) + r"):", "//127.0.0.1:", arg)

    processes: dict[str, Process] = {}
    try:
        for name in _ordered(services):
            command = services[name]["command"]
            assert command[0] == ".venv/bin/chatgate"
            args = [local(arg) for arg in command[1:]]
            processes[name] = Process(args, tmp_path / f"{name}.log", env={"CHATGATE_HOST": "127.0.0.1"},
                                      command=CHATGATE)
            port = args[args.index("--port") + 1]
            processes[name].wait_healthy(f"http://127.0.0.1:{port}", deadline=300)
        api = f"http://127.0.0.1:{ports['8000']}"

        def ready() -> bool:
            body: dict[str, Any] = httpx.get(f"{api}/ready", timeout=2).json()
            return bool(body["status"] == "ready" and sum(body["workers"].values()) == 2)

        poll(ready, what="both workers behind the API server", timeout=60, interval=0.5, ignore=(httpx.HTTPError, KeyError))
        models = httpx.get(f"{api}/v1/models", timeout=10).json()["data"]
        reply = httpx.post(f"{api}/v1/chat/completions", timeout=120, json={
            "model": models[0]["id"], "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0,
        })
        assert reply.status_code == 200, reply.text
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
    finally:
        for process in reversed(processes.values()):
            process.stop()
