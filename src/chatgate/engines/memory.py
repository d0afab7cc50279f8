"""Whether a model (or a LoRA adapter) fits in memory before it is loaded.

Ollama refuses a model "that requires more system memory than is available" before reading it;
vLLM stops at start naming memory. chatgate does both: each engine estimates what a load needs
(`MemoryNeed`: its weights, from the files on disk, plus any KV cache it reserves up front), a
`MemoryReader` says what the device has available, and `MemoryGuard.check` refuses a load that
would not fit with `--memory-headroom-gib` to spare (an `InsufficientMemoryError`, 409). At
start-up the CLI checks every model together (`check_startup`) and exits naming the problem.

Available host memory is the smaller of `MemAvailable` (/proc/meminfo) and, inside a cgroup v2
with `memory.max` set, that limit minus what the cgroup uses; on CUDA it is the device's free
memory. An estimate is a lower bound (activations, the tokenizer and Python come on top), which
is what the headroom is for; a load that runs out of memory anyway is caught where it happens
(`worker/lifecycle.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from chatgate.errors import InsufficientMemoryError

if TYPE_CHECKING:
    from chatgate.settings import EngineSettings

log = logging.getLogger(__name__)

GIB = 2**30

# Weight files a checkpoint folder may hold, in the order loaders prefer them.
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
# Stored dtypes that torch loads as float32 (the torch runner builds every model in float32).
_HALF_DTYPES = frozenset({"bfloat16", "float16", "half"})


@dataclass(frozen=True)
class MemoryNeed:
    """What loading a model takes on `device`: its weights and the KV cache reserved up front (bytes)."""

    device: str
    weights: int
    kv: int = 0

    @property
    def total(self) -> int:
        """Bytes in all."""
        return self.weights + self.kv


class MemoryReader(Protocol):
    """Says how much memory a device has available for a new load."""

    def available(self, device: str) -> int | None:
        """Bytes available on `device` (a torch device name), or None where it cannot tell."""
        ...


def meminfo_available(path: Path) -> int | None:
    """`MemAvailable` of a /proc/meminfo file in bytes (None if it is missing or has no such line)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "MemAvailable":
            number, _, unit = value.strip().partition(" ")
            if not number.isdigit():  # not the kernel's format: tell nothing rather than fail every load
                return None
            return int(number) * (1024 if unit.strip().lower() == "kb" else 1)
    return None


def _cgroup_dir(root: Path, proc_cgroup: Path) -> Path | None:
    """This process's cgroup v2 folder under `root`, from its `0::/path` line in /proc/self/cgroup."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return root / line[3:].strip().lstrip("/")
    return None


def _cgroup_room(folder: Path) -> int | None:
    """`memory.max` minus usage in one cgroup folder (None: no limit, or not cgroup v2)."""
    try:
        limit = (folder / "memory.max").read_text().strip()
        used = int((folder / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit():
        return None
    # Inactive page cache counts as used but the kernel drops it before it fails an allocation
    # (Docker's and Kubernetes' "working set" leave it out the same way).
    try:
        stat = dict(line.split(" ", 1) for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
        used -= int(stat.get("inactive_file", "0"))
    except (OSError, ValueError):
        pass
    return max(0, int(limit) - max(0, used))


def cgroup_available(root: Path, proc_cgroup: Path) -> int | None:
    """The least room under any `memory.max` from this process's cgroup up to `root` (None: no limit)."""
    folder = _cgroup_dir(root, proc_cgroup)
    if folder is None:
        return None
    rooms: list[int] = []
    while True:  # a parent's limit binds its children too
        room = _cgroup_room(folder)
        if room is not None:
            rooms.append(room)
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return min(rooms) if rooms else None


@dataclass(frozen=True)
class SystemMemory:
    """The machine's own memory: /proc/meminfo and cgroup v2 files (paths injectable for tests), or CUDA's."""

    meminfo: Path = Path("/proc/meminfo")
    cgroup_root: Path = Path("/sys/fs/cgroup")
    proc_cgroup: Path = Path("/proc/self/cgroup")

    def available(self, device: str) -> int | None:
        """Bytes available on `device`."""
        if device.startswith("cuda"):
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        host = meminfo_available(self.meminfo)
        cgroup = cgroup_available(self.cgroup_root, self.proc_cgroup)
        found = [n for n in (host, cgroup) if n is not None]
        return min(found) if found else None


def files_bytes(paths: Iterable[Path]) -> int:
    """The size on disk of `paths` together."""
    return sum(path.stat().st_size for path in paths)


def checkpoint_bytes(folder: Path, *, float32: bool = False) -> int:
    """Bytes the weights of a checkpoint folder take loaded: its weight files' size (of the first
    kind it holds), doubled when `float32` loads weights stored as 16-bit floats."""
    for pattern in _WEIGHT_GLOBS:
        files = sorted(folder.glob(pattern))
        if files:
            size = files_bytes(files)
            return size * 2 if float32 and _stored_dtype(folder) in _HALF_DTYPES else size
    return 0


def _stored_dtype(folder: Path) -> str | None:
    """The dtype config.json says the weights are stored in."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dtype = config.get("torch_dtype") or config.get("dtype") if isinstance(config, dict) else None
    return str(dtype) if dtype else None


def gguf_elements(path: Path) -> int:
    """How many weights a GGUF file holds (read from its tensor index, not its data)."""
    from gguf import GGUFReader

    return sum(int(tensor.n_elements) for tensor in GGUFReader(path).tensors)


def adapter_bytes(path: Path) -> int | None:
    """The size on disk of a LoRA adapter (a PEFT folder or a GGUF file); None if there is none
    there (its load names that problem itself)."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return checkpoint_bytes(path)
    return None


def gib(size: int) -> str:
    """Bytes as GiB for messages, two decimals."""
    return f"{size / GIB:.2f} GiB"


# What to do about a refusal, while serving and at start.
RUNNING_ADVICE = "Unload another model (/v1/models/unload) or free memory, then load it again."
STARTUP_ADVICE = (
    "Serve fewer or smaller models, free memory, lower --memory-headroom-gib or --kv-cache-gib, "
    "or skip this check with --no-memory-check."
)


class MemoryGuard:
    """Refuses a load that would not fit on its device with the headroom to spare.

    `loads` is held around each check and the load it allows (`worker/lifecycle.py`): the guards
    of one process's models share it, so two loads asked at once do not both count the memory
    the other is about to take."""

    def __init__(
        self, *, reader: MemoryReader, headroom_gib: float, enabled: bool = True, loads: asyncio.Lock | None = None
    ) -> None:
        self._reader = reader
        self.headroom = int(headroom_gib * GIB)
        self.enabled = enabled
        self.loads = loads or asyncio.Lock()

    @classmethod
    def of(
        cls, settings: EngineSettings, reader: MemoryReader | None = None, loads: asyncio.Lock | None = None
    ) -> MemoryGuard:
        """The guard `--memory-headroom-gib` and `--memory-check` ask for, reading `reader` (the
        machine's by default), taking turns on `loads` with the process's other models."""
        return cls(
            reader=reader or SystemMemory(), headroom_gib=settings.memory_headroom_gib,
            enabled=settings.memory_check, loads=loads,
        )

    def check(self, what: str, need: MemoryNeed | None, *, param: str = "model", advice: str = RUNNING_ADVICE) -> None:
        """Raise `InsufficientMemoryError` naming `what` if `need` does not fit now (file reads:
        call it in a thread). Nothing to check when the need or the available memory is unknown."""
        if not self.enabled or need is None or need.total <= 0:
            return
        available = self._reader.available(need.device)
        if available is None:
            return
        if need.total + self.headroom > available:
            kv = f" and {gib(need.kv)} of KV cache reserved up front" if need.kv else ""
            raise InsufficientMemoryError(
                f"Loading {what} requires more memory ({gib(need.total)}: {gib(need.weights)} of weights{kv}; "
                f"and {gib(self.headroom)} kept free by --memory-headroom-gib) than is available on "
                f"{need.device} ({gib(available)}). {advice}",
                param=param,
            )
        log.info("loading %s needs %s; %s available on %s", what, gib(need.total), gib(available), need.device)

    def check_estimate(
        self, what: str, estimate: Callable[[], MemoryNeed | None], *, param: str = "model"
    ) -> None:
        """`check` what `estimate` says a load needs. Off (--no-memory-check), nothing is read;
        an estimate that fails (files it cannot read or parse) is an unknown need, as at start:
        the load names that problem itself. Reads files: call it in a thread."""
        if not self.enabled:
            return
        try:
            need = estimate()
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: `expanduser` of an unknown user
            log.warning("no memory estimate for %s, not checked: %s", what, exc)
            return
        self.check(what, need, param=param)

    @contextlib.asynccontextmanager
    async def admitting(
        self, what: str, estimate: Callable[[], MemoryNeed | None], *, param: str = "model"
    ) -> AsyncIterator[None]:
        """Hold the process's turn to load (`loads`) while `estimate` is checked, off the event
        loop, and while the load it admits runs in the block, so the next model's check sees what
        this one took. Off (--no-memory-check), the block runs at once: loads need not take turns."""
        if not self.enabled:
            yield
            return
        async with self.loads:
            await asyncio.to_thread(self.check_estimate, what, estimate, param=param)
            yield


def check_startup(needs: list[tuple[str, MemoryNeed | None]], guard: MemoryGuard) -> None:
    """Check that every model to start fits together: their needs on each device are summed
    (they load at once); an `InsufficientMemoryError` names them all."""
    by_device: dict[str, list[tuple[str, MemoryNeed]]] = {}
    for name, need in needs:
        if need is not None:
            by_device.setdefault(need.device, []).append((name, need))
    for device, found in by_device.items():
        names = ", ".join(f"`{name}`" for name, _ in found)
        what = f"the model {names}" if len(found) == 1 else f"the models {names} together"
        total = MemoryNeed(device, sum(n.weights for _, n in found), sum(n.kv for _, n in found))
        guard.check(what, total, advice=STARTUP_ADVICE)


def check_models_fit(configs: list[EngineSettings], reader: MemoryReader | None = None) -> None:
    """Before a process starts its models: refuse (`InsufficientMemoryError`) if together they
    would not fit. A model whose engine cannot be built is left for its start to name the problem."""
    from chatgate.engines import create_engine

    needs: list[tuple[str, MemoryNeed | None]] = []
    # Each model's own flags say whether it is counted; the sum keeps the most headroom any asks.
    checked = [config for config in configs if config.engine != "openai" and config.memory_check]
    for config in checked:
        try:
            engine = create_engine(config)  # builds nothing heavy: engines load in `start`
            need = engine.memory_need()
        except (OSError, ValueError) as exc:
            log.debug("no memory estimate for %s: %s", config.model_path, exc)
            continue
        if need is not None:  # an engine without an estimate may not know its name before it starts
            needs.append(((config.model_names or [engine.info.name])[0], need))
    if checked:
        headroom = max(config.memory_headroom_gib for config in checked)
        check_startup(needs, MemoryGuard(reader=reader or SystemMemory(), headroom_gib=headroom))
