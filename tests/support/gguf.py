"""Tiny GGUF files written with `gguf`, of any architecture a test names."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def gguf_of(tmp_path: Path, arch: str) -> Path:
    """A one-tensor GGUF file of architecture `arch` in `tmp_path`, for loaders to refuse by name."""
    from gguf import GGUFWriter

    path = tmp_path / f"{arch}.gguf"
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
