"""Which models a process serves: `--model` specs (a path, then KEY=VALUE engine settings),
packaged models by name, Gemma's parts assembled and checked, and bad paths or architectures
a runner cannot load refused at start, named."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from chatgate.cli import build_settings, parser
from chatgate.engines.loading import (
    GEMMA_MODEL_PATH,
    GEMMA_NAME,
    ModelSource,
    _assemble,
    cached_checkpoint,
    gguf_architecture,
    resolve_chat_model,
)
from chatgate.settings import ServeSettings
from tests.support.gguf import gguf_of


def serve(*argv: str) -> ServeSettings:
    settings: ServeSettings = build_settings(ServeSettings, parser().parse_args(["serve", *argv]))
    return settings


def test_each_model_flag_is_one_model_with_its_own_settings() -> None:
    s = serve("--model", "default", "--model", "gemma3-270m model-names=gemma,g3 max-model-len=2048 max-running=4",
              "--max-running", "8", "--num-threads", "1")
    first, second = s.chat_models()
    assert (first.model_path, first.model_names, first.max_running) == ("default", [], 8)
    assert (second.model_path, second.model_names, second.max_model_len, second.max_running) == (
        "gemma3-270m", ["gemma", "g3"], 2048, 4,
    )
    assert first.num_threads == second.num_threads == 1  # the command's flags are every model's defaults


def test_without_model_flags_the_model_path_is_the_one_model() -> None:
    s = serve("--model-path", "gemma3-270m", "--model-names", "a,b")
    assert [(m.model_path, m.model_names) for m in s.chat_models()] == [("gemma3-270m", ["a", "b"])]


def test_unset_threads_are_shared_among_the_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 9)
    s = serve("--model", "default", "--model", "gemma3-270m", "--model", "gemma3-270m model-names=g num-threads=3")
    assert [m.num_threads for m in s.chat_models()] == [2, 2, 3]  # 8 cores (one serves HTTP) over 3
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert [m.num_threads for m in serve("--model", "default", "--model", "gemma3-270m").chat_models()] == [1, 1]


def test_model_specs_from_the_environment_are_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATGATE_MODEL", json.dumps(["default", "gemma3-270m model-names=g"]))
    assert [m.model_names for m in serve().chat_models()] == [[], ["g"]]
    monkeypatch.setenv("CHATGATE_MODEL", "gemma3-270m model-names=a,b")
    assert [m.model_names for m in serve().chat_models()] == [["a", "b"]]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--model", "default", "--model", "default"], "two models are served under one name"),
        (["--model", "default model-names=x", "--model", "gemma3-270m model-names=x"], "['x']"),
        (["--model", "default", "--model-path", "gemma3-270m"], "not both"),
        (["--model", "default port=9"], "'port=9' is not KEY=VALUE"),
        (["--model", "default model-names"], "is not KEY=VALUE"),
        (["--model", "default max-running=0"], "max-running"),
        (["--model", "default dtype=fp4"], "dtype"),
        (["--model", ""], "empty"),
        (["--model", "/no/such/model.gguf model-names=x"], "'/no/such/model.gguf' does not exist"),
    ],
)
def test_bad_model_specs_stop_the_start_naming_the_problem(argv: list[str], says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        serve(*argv)
    assert says in str(caught.value)


def test_a_model_path_that_names_no_model_stops_the_start(tmp_path: Path) -> None:
    from chatgate.settings import WorkerSettings

    with pytest.raises(ValidationError, match="'/no/such.gguf' does not exist"):
        serve("--model-path", "/no/such.gguf")
    with pytest.raises(ValidationError, match="nor a Hugging Face model folder"):
        build_settings(WorkerSettings, parser().parse_args(["worker", "--model-path", str(tmp_path)]))
    # Engines that take any name (an upstream's model, the fake) are not checked.
    assert serve("--model-path", "anything", "--engine", "fake").model_path == "anything"


def test_the_command_line_reports_a_bad_model_without_a_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from chatgate.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["serve", "--model", "default", "--model", str(tmp_path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "neither a .gguf file nor a Hugging Face model folder" in err and "Traceback" not in err


def test_packaged_models_by_name() -> None:
    gemma = resolve_chat_model(GEMMA_MODEL_PATH)
    assert gemma.name == GEMMA_NAME and gemma.assembled_from is not None and not gemma.packaged
    assert resolve_chat_model("default").packaged


def test_assembly_checks_the_hash_and_leaves_no_partial_file(tmp_path: Path) -> None:
    parts = []
    for i in range(3):
        part = tmp_path / f"p{i}"
        part.write_bytes(bytes([i]) * 1000)
        parts.append(part)
    whole = b"".join(p.read_bytes() for p in parts)
    target = tmp_path / "out" / "model.gguf"
    _assemble(parts, target, hashlib.sha256(whole).hexdigest())
    assert target.read_bytes() == whole
    bad = tmp_path / "out" / "bad.gguf"
    with pytest.raises(ValueError, match="SHA-256"):
        _assemble(parts, bad, "0" * 64)
    assert not bad.exists() and sorted(p.name for p in target.parent.iterdir()) == ["model.gguf"]


def test_an_architecture_the_torch_runner_cannot_read_is_named(tmp_path: Path) -> None:
    path = gguf_of(tmp_path, "nosucharch")
    assert gguf_architecture(path) == "nosucharch"
    with pytest.raises(ValueError, match="torch runner cannot load nosucharch.gguf.*'nosucharch'"):
        cached_checkpoint(ModelSource("x", path.parent, path.name), tmp_path / "cache")


def test_an_architecture_llama_cpp_cannot_load_is_named(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")
    from chatgate.engines.runners.llamacpp import GgufModel

    with pytest.raises(ValueError, match="llama.cpp could not load .*architecture 'nosucharch'"):
        GgufModel.load(gguf_of(tmp_path, "nosucharch"))


def test_a_file_that_is_not_gguf_is_named(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        gguf_architecture(path)
