"""What a model load needs and what the machine has (`engines/memory.py`): /proc/meminfo and
cgroup v2 files read from temp copies, weight sizes from files on disk, the guard's refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chatgate.engines.memory import (
    GIB,
    MemoryGuard,
    MemoryNeed,
    SystemMemory,
    adapter_bytes,
    cgroup_available,
    check_models_fit,
    check_startup,
    checkpoint_bytes,
    gguf_elements,
    meminfo_available,
)
from chatgate.errors import InsufficientMemoryError
from chatgate.settings import EngineSettings, ServeSettings
from tests.support.memory import SetMemory

MEMINFO = """MemTotal:       16314204 kB
MemFree:          512000 kB
MemAvailable:    8388608 kB
Buffers:          102400 kB
"""


def _write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_meminfo_gives_mem_available_in_bytes(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text(MEMINFO)
    assert meminfo_available(tmp_path / "meminfo") == 8 * GIB
    (tmp_path / "old").write_text("MemTotal: 100 kB\nMemFree: 50 kB\n")  # kernels before 3.14
    assert meminfo_available(tmp_path / "old") is None
    assert meminfo_available(tmp_path / "missing") is None


def _cgroup(tmp_path: Path, *, leaf: dict[str, str], parent: dict[str, str] | None = None) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    _write(root / "app", parent or {})
    _write(root / "app" / "worker", leaf)
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/app/worker\n")
    return root, proc


def test_cgroup_room_is_the_limit_minus_usage_less_inactive_page_cache(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, leaf={
        "memory.max": str(4 * GIB), "memory.current": str(3 * GIB),
        "memory.stat": f"anon {2 * GIB}\ninactive_file {GIB // 2}\nactive_file 0\n",
    })
    assert cgroup_available(root, proc) == 4 * GIB - (3 * GIB - GIB // 2)


def test_a_parents_tighter_limit_binds_and_no_limit_is_none(tmp_path: Path) -> None:
    root, proc = _cgroup(
        tmp_path,
        leaf={"memory.max": "max", "memory.current": str(GIB)},
        parent={"memory.max": str(2 * GIB), "memory.current": str(GIB + GIB // 4)},
    )
    assert cgroup_available(root, proc) == GIB - GIB // 4
    free, proc_free = _cgroup(tmp_path / "free", leaf={"memory.max": "max", "memory.current": str(GIB)})
    assert cgroup_available(free, proc_free) is None
    v1 = tmp_path / "v1"
    v1.write_text("4:memory:/process_api/abc\n1:cpu:/\n")  # cgroup v1 only: not read
    assert cgroup_available(root, v1) is None


def test_system_memory_is_the_smaller_of_the_host_and_the_cgroup(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text(MEMINFO)  # 8 GiB available on the host
    root, proc = _cgroup(tmp_path, leaf={"memory.max": str(3 * GIB), "memory.current": str(GIB)})
    assert SystemMemory(tmp_path / "meminfo", root, proc).available("cpu") == 2 * GIB
    roomy, roomy_proc = _cgroup(tmp_path / "roomy", leaf={"memory.max": str(64 * GIB), "memory.current": "0"})
    assert SystemMemory(tmp_path / "meminfo", roomy, roomy_proc).available("cpu") == 8 * GIB
    assert SystemMemory(tmp_path / "none", tmp_path / "none", tmp_path / "none").available("cpu") is None
    assert SystemMemory().available("cpu") is not None  # this machine's own files parse


def test_checkpoint_size_is_its_weight_files_doubled_when_16_bit_loads_as_float32(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model-00001.safetensors").write_bytes(b"x" * 1000)
    (folder / "model-00002.safetensors").write_bytes(b"x" * 500)
    (folder / "pytorch_model.bin").write_bytes(b"x" * 9999)  # ignored beside safetensors
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert checkpoint_bytes(folder) == 1500
    assert checkpoint_bytes(folder, float32=True) == 3000
    (folder / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert checkpoint_bytes(folder, float32=True) == 1500
    assert checkpoint_bytes(tmp_path / "empty") == 0
    assert adapter_bytes(folder) == 1500
    assert adapter_bytes(folder / "pytorch_model.bin") == 9999
    assert adapter_bytes(tmp_path / "nowhere") is None  # the load names a missing path itself


def test_a_gguf_files_weights_are_counted_from_its_index(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("output.weight", np.zeros((3, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_elements(path) == 56


def test_the_guard_refuses_naming_the_model_and_both_sizes() -> None:
    memory = SetMemory(2 * GIB)
    guard = MemoryGuard(reader=memory, headroom_gib=0.5)
    guard.check("the model `a`", MemoryNeed("cpu", GIB, GIB // 2))  # 1.5 + 0.5 fits in 2 exactly
    with pytest.raises(InsufficientMemoryError) as refused:
        guard.check("the model `a`", MemoryNeed("cuda:0", GIB, GIB // 2 + 1))
    error = refused.value
    assert (error.status, error.code, error.param) == (409, "insufficient_memory", "model")
    assert "the model `a` requires more memory (1.50 GiB: 1.00 GiB of weights and 0.50 GiB of KV" in error.message
    assert "0.50 GiB kept free by --memory-headroom-gib" in error.message
    assert "available on cuda:0 (2.00 GiB)" in error.message
    assert memory.asked == ["cpu", "cuda:0"]


def test_the_guard_checks_nothing_when_off_or_when_a_size_is_unknown() -> None:
    MemoryGuard(reader=SetMemory(0), headroom_gib=1, enabled=False).check("x", MemoryNeed("cpu", GIB))
    MemoryGuard(reader=SetMemory(0), headroom_gib=1).check("x", None)

    class Unknown:
        def available(self, device: str) -> int | None:
            return None

    MemoryGuard(reader=Unknown(), headroom_gib=1).check("x", MemoryNeed("cpu", GIB))


def test_models_starting_together_are_summed_per_device() -> None:
    guard = MemoryGuard(reader=SetMemory(3 * GIB), headroom_gib=0)
    fits = [("a", MemoryNeed("cpu", 2 * GIB)), ("b", MemoryNeed("cuda", 2 * GIB)), ("c", None)]
    check_startup(fits, guard)  # 2 GiB on each device
    with pytest.raises(InsufficientMemoryError, match="the models `a`, `b` together requires more memory \\(4.00 GiB"):
        check_startup([("a", MemoryNeed("cpu", 2 * GIB)), ("b", MemoryNeed("cpu", 2 * GIB))], guard)


def test_the_default_models_estimate_on_each_engine() -> None:
    from chatgate.engines import create_engine

    torch_need = create_engine(EngineSettings(engine="transformers")).memory_need()
    assert torch_need is not None and torch_need.kv == 0  # its KV grows with the batch
    # SmolLM2-135M in float32: about 135 million weights of 4 bytes.
    assert 0.5e9 < torch_need.weights < 0.6e9, torch_need
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")
    llama = create_engine(EngineSettings(engine="llama.cpp", kv_cache_gib=1, prefix_cache_gib=0.25)).memory_need()
    assert llama is not None and llama.weights * 2 == pytest.approx(torch_need.weights, rel=0.02)  # bf16
    assert llama.kv == int(1.25 * GIB)  # allocated up front


def test_serve_refuses_before_loading_when_its_models_do_not_fit_together() -> None:
    settings = ServeSettings(model=["default", "default model-names=second engine=transformers"])
    with pytest.raises(InsufficientMemoryError, match="the models `SmolLM2-135M-Instruct`, `second` together"):
        check_models_fit(settings.chat_models(), SetMemory(GIB // 2))
    check_models_fit(settings.chat_models(), SetMemory(64 * GIB))
    off = ServeSettings(memory_check=False)
    check_models_fit(off.chat_models(), SetMemory(0))
    check_models_fit([EngineSettings(engine="nosuch")], SetMemory(0))  # its start names the bad engine
    check_models_fit([EngineSettings(engine="vllm")], SetMemory(0))  # no estimate (vLLM checks its own), no name yet


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "2000000", "lots"])
def test_a_bad_headroom_is_refused_naming_the_flag(value: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="memory_headroom_gib"):
        EngineSettings(memory_headroom_gib=value)


def test_the_flags_reach_the_settings() -> None:
    from chatgate.cli import COMMANDS, build_settings, parser

    for command in ("serve", "worker"):
        args = parser().parse_args([command, "--memory-headroom-gib", "2.5", "--no-memory-check"])
        settings = build_settings(COMMANDS[command][0], args)
        assert (settings.memory_headroom_gib, settings.memory_check) == (2.5, False)


def test_a_workers_refusal_keeps_its_status_across_the_worker_protocol() -> None:
    from chatgate.errors import from_fastchat_code

    error = InsufficientMemoryError("Loading the model `a` requires more memory", param="model")
    back = from_fastchat_code(error.fastchat_code, error.message, param=error.param)
    assert isinstance(back, InsufficientMemoryError) and back.body() == error.body() and back.status == 409
