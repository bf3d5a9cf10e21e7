"""Fashion-MNIST read from IDX files (gzipped or raw), e.g. Debian's ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from vvtq.data.base import FASHION_MNIST_MEAN, FASHION_MNIST_STD, ArrayImageDataset, DatasetError

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_SPLIT_PREFIX = {"train": "train", "test": "t10k", "val": "t10k"}
_INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` or pass another directory"


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as gz:
                    return gz.read()
            return f.read()
    except FileNotFoundError as e:
        raise DatasetError(f"IDX file not found: {path}; {_INSTALL_HINT}") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or raw) into a numpy array, validating magic number, dims and size."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"corrupt IDX file {path}: only {len(data)} bytes, no header")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"corrupt IDX file {path}: bad magic number 0x{data[:4].hex()}")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    if ndim == 0:
        raise DatasetError(f"corrupt IDX file {path}: zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"corrupt IDX file {path}: truncated header ({len(data)} bytes, need {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * j : 8 + 4 * j], "big") for j in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes in"
        raise DatasetError(
            f"corrupt IDX file {path}: {what} data (dims {dims}: expected {expected} bytes, got {len(data)})"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzipped when ``compress`` or the name ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    code = next(
        (
            c
            for c, dt in _IDX_DTYPES.items()
            if dt.kind == array.dtype.kind and dt.itemsize == array.dtype.itemsize
        ),
        None,
    )
    if code is None:
        raise ValueError(f"dtype {array.dtype} cannot be stored in IDX")
    payload = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload += array.astype(_IDX_DTYPES[code], copy=False).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    with open(path, "wb") as f:
        f.write(gzip.compress(payload, mtime=0) if compress else payload)


def _find(root: Path, stem: str) -> Path:
    for cand in (root / f"{stem}.gz", root / stem):
        if cand.is_file():
            return cand
    raise DatasetError(f"Fashion-MNIST file {root / stem}(.gz) not found; {_INSTALL_HINT}")


def load_fashion_mnist_arrays(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the images ``[N, 28, 28]`` uint8 and labels ``[N]`` of one split (``train``/``test``)."""
    if split not in _SPLIT_PREFIX:
        raise DatasetError(f"Fashion-MNIST split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    root_p = Path(root)
    if not root_p.is_dir():
        raise DatasetError(f"Fashion-MNIST directory {root_p} not found; {_INSTALL_HINT}")
    prefix = _SPLIT_PREFIX[split]
    img_path = _find(root_p, f"{prefix}-images-idx3-ubyte")
    lab_path = _find(root_p, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"corrupt image file {img_path}: expected uint8 [N,H,W], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(
            f"corrupt label file {lab_path}: expected uint8 [N], got {labels.dtype} {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(f"corrupt label file {lab_path}: label {int(labels.max())} out of range 0..9")
    return images, labels


class FashionMNIST(ArrayImageDataset):
    """Fashion-MNIST split held in memory (uint8 ``[N, 28, 28]``); ``in_chans`` = 1."""

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train") -> None:
        root = DEFAULT_FASHION_MNIST if root is None else root
        images, labels = load_fashion_mnist_arrays(root, split)
        super().__init__(
            torch.from_numpy(images),
            torch.from_numpy(labels.astype(np.int64)),
            FASHION_MNIST_CLASSES,
            name="fashion_mnist",
            split="test" if split == "val" else split,
            root=str(Path(root).resolve()),
            mean=FASHION_MNIST_MEAN,
            std=FASHION_MNIST_STD,
        )
