"""Writing files atomically: a temporary file in the same folder, then a rename, so that no
reader ever sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def distinct_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage): a
    view of memory another entry (or nothing else) uses is copied."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key in seen or t.untyped_storage().nbytes() != t.nbytes:
                t = t.clone()
            seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[name] = t
    return out
