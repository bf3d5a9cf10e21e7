"""Writing files: atomically, and in the safetensors layout. Checkpoints, packed exports and soft-label files all
go through these two routines.

``atomic_write(path)`` hands out a temporary file next to ``path`` and renames it over ``path`` once it is whole
(``os.replace``), so a kill at any moment leaves the previous file intact. ``safetensors_header(entries,
metadata)`` is the one safetensors header writer: the 8-byte length, the JSON index (metadata keys sorted, so
the same tensors give the same bytes in every process) padded so the data start 8-aligned, and where each
tensor's bytes go.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

#: safetensors' name of each torch dtype it stores
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` (``.NAME.*.tmp``) to write; when the block ends, it is fsynced, given an
    ordinary file's mode and renamed over ``path``. If the block raises, it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; these are ordinary files
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def safetensors_header(entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                       metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header of a safetensors file holding ``entries`` (name, dtype, shape), and each tensor's ``(start,
    end)`` byte span in the file. Tensors are laid out largest element first, then by name, so that each starts
    aligned to its element size."""
    order = sorted(entries, key=lambda e: (-e[1].itemsize, e[0]))
    index: dict[str, object] = {}
    if metadata:
        index["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    spans, pos = {}, 0
    for name, dtype, shape in order:
        if name in spans or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is duplicated or reserved")
        if dtype not in ST_DTYPES:
            raise ValueError(f"tensor {name!r}: safetensors cannot store dtype {dtype}")
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * dtype.itemsize
        index[name] = {"dtype": ST_DTYPES[dtype], "shape": [int(d) for d in shape], "data_offsets": [pos, pos + nbytes]}
        spans[name] = (pos, pos + nbytes)
        pos += nbytes
    text = json.dumps(index, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data start 8-aligned, as safetensors itself writes
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {k: (start + a, start + b) for k, (a, b) in spans.items()}


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw little-endian bytes of a tensor (a buffer, no copy where the tensor is contiguous on the CPU)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
