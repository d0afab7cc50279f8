"""vLLM processes for the tests, in the optional `.venv-vllm`, each started at most once per session.

Two kinds, because they test different things: a chatgate fleet whose worker runs `--engine vllm`
(controller + vllm worker + API server; the parametrised integration tests and the mixed fleet
share it), and vLLM's own OpenAI server (what the `openai` engine forwards to). Both run eagerly
(`--enforce-eager`): vLLM CPU's torch.compile warm-up tripled the start (99.6 s against 28.7 s to
healthy, measured in one run) for ~8% faster decoding, which tests do not need.

Skipped with the reason where `.venv-vllm` was not built (`make vllm`); `CHATGATE_VLLM_PYTHON`
points at another vLLM Python (a git worktree uses the main checkout's venv).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.polling import poll
from tests.support.processes import Process, free_port, worker_count

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("CHATGATE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
# `make vllm` stamps the venv once every install step has passed; a half-built venv is skipped.
VLLM_READY = "CHATGATE_VLLM_PYTHON" in os.environ or (ROOT / ".venv-vllm" / ".installed").exists()
SKIP_REASON = "vLLM venv not installed (make vllm builds .venv-vllm; or set CHATGATE_VLLM_PYTHON)"
M = "SmolLM2-135M-Instruct"
# chatgate runs from src/ in the vLLM venv; vLLM CPU's KV cache is sized for a shared machine.
VLLM_ENV = {"PYTHONPATH": str(ROOT / "src"), "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
START_DEADLINE = 600.0  # vLLM CPU starts in ~30 s eagerly on a quiet machine; the suite is not quiet
HEARTBEAT = 1.0


def require_vllm() -> None:
    """Skip the calling test (with the reason) where no vLLM venv exists."""
    if not VLLM_READY:
        pytest.skip(SKIP_REASON)


def weights(directory: Path) -> Path:
    """A copy of the float32 folder chatgate converts, so vLLM can never alter chatgate's cache."""
    from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
    from chatgate.settings import default_cache_dir

    target = directory / "weights"
    if not target.exists():
        shutil.copytree(cached_checkpoint(resolve_chat_model("default"), default_cache_dir()), target)
    return target


@dataclass
class OpenAIServer:
    """vLLM's own OpenAI server on the default model (float32, eager), started in the background:
    it boots while the vllm-worker fleet does (two cores, two mostly single-threaded starts)."""

    process: Process
    url: str

    @classmethod
    def start(cls, logs: Path) -> OpenAIServer:
        """Launch the server; `ready` waits for it."""
        port = free_port()
        args = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(weights(logs)), "--served-model-name", M,
                "--max-model-len", "4096", "--dtype", "float32", "--enforce-eager", "--host", "127.0.0.1",
                "--port", str(port),
                # vLLM answers a required or named tool_choice only with a tool-call parser enabled.
                "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
        process = Process(args, logs / "vllm-openai.log", env=VLLM_ENV, command=[str(VLLM_PYTHON)], group=True)
        return cls(process, f"http://127.0.0.1:{port}")

    def ready(self) -> OpenAIServer:
        """This server, once healthy."""
        self.process.wait_healthy(self.url, deadline=START_DEADLINE)
        return self


@dataclass
class Fleet:
    """A controller, workers and one API server as processes; `url[name]` is where each listens."""

    logs: Path
    processes: dict[str, Process] = field(default_factory=dict)
    url: dict[str, str] = field(default_factory=dict)

    def start(self, name: str, args: list[str], *, vllm: bool = False, deadline: float = 120.0, wait: bool = True) -> Process:
        """Run `chatgate args --port P` (in the vLLM venv if `vllm`) and wait until it is healthy
        (unless not `wait`: `ready` waits later)."""
        port = free_port()
        self.url[name] = f"http://127.0.0.1:{port}"
        command = [str(VLLM_PYTHON), "-m", "chatgate.cli"] if vllm else None
        process = Process([*args, "--port", str(port)], self.logs / f"{name}.log", env=VLLM_ENV if vllm else None,
                          command=command, group=vllm)
        self.processes[name] = process
        if wait:
            process.wait_healthy(self.url[name], deadline=deadline)
        return process

    def ready(self, name: str, deadline: float = START_DEADLINE) -> None:
        """Wait until the process started as `name` is healthy."""
        self.processes[name].wait_healthy(self.url[name], deadline=deadline)

    def worker(self, name: str, *args: str, vllm: bool = False, deadline: float = 120.0, wait: bool = True) -> Process:
        """A worker registered with this fleet's controller."""
        return self.start(name, ["worker", "--host", "127.0.0.1", "--controller-address", self.url["controller"],
                                 "--heartbeat-interval", str(HEARTBEAT), *args], vllm=vllm, deadline=deadline, wait=wait)

    def workers(self) -> int:
        """Workers the API server has for M (-1 when it cannot tell)."""
        return worker_count(self.url["api"], M, timeout=2)

    def wait_workers(self, count: int) -> None:
        """Poll until the API server's table holds `count` workers for M."""
        poll(lambda: self.workers() == count, what=f"{count} workers for {M}", timeout=30, interval=0.2)

    def stop(self, *names: str) -> None:
        """Stop the named processes (all of them, last started first, when none is named)."""
        for name in names or reversed(list(self.processes)):
            process = self.processes.pop(name, None)
            if process is not None:
                process.stop()


def launch_vllm_fleet(logs: Path) -> Fleet:
    """Start a controller and a `worker --engine vllm` (float32, eager) without waiting for the
    worker: `finish_vllm_fleet` waits for it and adds the API server."""
    fleet = Fleet(logs)
    try:
        fleet.start("controller", ["controller", "--host", "127.0.0.1", "--heartbeat-expiration", str(3 * HEARTBEAT)])
        fleet.worker("vllm", "--engine", "vllm", "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
                     "--model-names", M, vllm=True, wait=False)
    except BaseException:
        fleet.stop()
        raise
    return fleet


def finish_vllm_fleet(fleet: Fleet) -> Fleet:
    """The launched fleet with its API server, all healthy."""
    try:
        fleet.ready("vllm")
        fleet.start("api", ["api", "--host", "127.0.0.1", "--controller-address", fleet.url["controller"],
                            "--worker-table-refresh", "0.5"])
        fleet.wait_workers(1)
    except BaseException:
        fleet.stop()
        raise
    return fleet


@dataclass
class VllmBoot:
    """The session's vLLM processes, launched when the session starts (see the `vllm_boot` fixture)."""

    server: OpenAIServer
    fleet: Fleet


def wants_vllm(session: pytest.Session) -> bool:
    """Whether any selected test uses the session's vLLM processes."""
    names = {"vllm_openai", "vllm_fleet"}
    return any(names & set(getattr(item, "fixturenames", ())) or "[vllm]" in item.nodeid for item in session.items)
