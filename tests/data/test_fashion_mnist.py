import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vvtq.data import (
    DEFAULT_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    DatasetError,
    FashionMNIST,
    build_dataset,
    read_idx,
    write_idx,
)

HAVE_REAL = all(
    os.path.isfile(os.path.join(DEFAULT_FASHION_MNIST, f"{p}-{k}.gz"))
    for p in ("train", "t10k")
    for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
)
real = pytest.mark.skipif(not HAVE_REAL, reason="dataset-fashion-mnist not installed")


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.tobytes()


def make_fmnist_dir(
    root: Path, n: int = 6, gz: bool = True, prefix: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labs = (np.arange(n) % 10).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for stem, arr, dims in (
        (f"{prefix}-images-idx3-ubyte", imgs, 3),
        (f"{prefix}-labels-idx1-ubyte", labs, 1),
    ):
        assert arr.ndim == dims
        data = idx_bytes(arr, 0x08)
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (root / stem).write_bytes(data)
    return imgs, labs


@real
def test_real_train_split():
    ds = FashionMNIST(split="train")
    assert len(ds) == 60000 and ds.in_chans == 1 and ds.num_classes == 10
    assert ds.classes == FASHION_MNIST_CLASSES
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    counts = torch.bincount(ds.label_tensor, minlength=10)
    assert counts.tolist() == [6000] * 10
    assert [ds.get_label(i) for i in range(10)] == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    mean = ds.images.float().mean().item() / 255
    assert abs(mean - ds.mean[0]) < 1e-3
    x = ds.get_image(0)
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.5


@real
def test_real_test_split_and_build():
    ds = build_dataset("fashion_mnist", "test")
    assert isinstance(ds, FashionMNIST) and len(ds) == 10000
    assert torch.bincount(ds.label_tensor, minlength=10).tolist() == [1000] * 10
    assert [ds.get_label(i) for i in range(5)] == [9, 2, 1, 1, 6]
    assert ds.identity()["split"] == "test"
    assert FashionMNIST(split="val").fingerprint() == ds.fingerprint()


def test_parse_handmade_raw_and_gz(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "raw").write_bytes(idx_bytes(a, 0x08))
    (tmp_path / "comp").write_bytes(gzip.compress(idx_bytes(a, 0x08)))
    for name in ("raw", "comp"):
        b = read_idx(tmp_path / name)
        assert b.dtype == np.uint8 and np.array_equal(a, b)
    # big-endian int32 and float32
    c = np.array([[1, -2, 70000]], dtype=">i4")
    (tmp_path / "i32").write_bytes(idx_bytes(c, 0x0C))
    assert read_idx(tmp_path / "i32").tolist() == [[1, -2, 70000]]
    f = np.array([0.5, -1.25], dtype=">f4")
    (tmp_path / "f32").write_bytes(idx_bytes(f, 0x0D))
    assert read_idx(tmp_path / "f32").tolist() == [0.5, -1.25]


def test_write_idx_roundtrip(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (3, 5, 2), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", a)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    write_idx(tmp_path / "b", a.astype(np.int32))
    assert np.array_equal(read_idx(tmp_path / "b"), a)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"\x00\x00", "no header"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"ab", "magic"),
        (b"\x00\x00\x08\x00", "zero dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc", "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abcd", "trailing"),
    ],
)
def test_corrupt_idx(tmp_path, data, words):
    p = tmp_path / "bad-idx"
    p.write_bytes(data)
    with pytest.raises(DatasetError, match=words) as ei:
        read_idx(p)
    assert str(p) in str(ei.value)


def test_truncated_gzip(tmp_path):
    a = np.zeros((10, 28, 28), dtype=np.uint8)
    blob = gzip.compress(idx_bytes(a, 0x08))
    p = tmp_path / "x.gz"
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match=str(p)):
        read_idx(p)


@pytest.mark.parametrize("gz", [True, False])
def test_handmade_dataset_dir(tmp_path, gz):
    imgs, labs = make_fmnist_dir(tmp_path, n=7, gz=gz)
    ds = FashionMNIST(tmp_path, "train")
    assert len(ds) == 7 and ds.labels() == labs.tolist()
    assert torch.equal(ds.get_image(3), torch.from_numpy(imgs[3]).float().div(255).unsqueeze(0))
    assert torch.equal(ds.get_image(-1), ds.get_image(6))
    with pytest.raises(IndexError):
        ds.get_image(7)
    ds2 = build_dataset("Fashion-MNIST", "train", root=str(tmp_path))
    assert ds2.fingerprint() == ds.fingerprint()


def test_missing_dir_and_files(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as ei:
        FashionMNIST(missing)
    assert str(missing) in str(ei.value)
    make_fmnist_dir(tmp_path, prefix="train")
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        FashionMNIST(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(tmp_path, "validation")


def test_count_mismatch_and_bad_labels(tmp_path):
    make_fmnist_dir(tmp_path, n=5)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8), 8)))
    with pytest.raises(DatasetError, match="5 images but"):
        FashionMNIST(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.full(5, 12, np.uint8), 8))
    )
    with pytest.raises(DatasetError, match="out of range"):
        FashionMNIST(tmp_path)
    # labels file given where images are expected: wrong ndim
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8), 8)))
    with pytest.raises(DatasetError, match="expected uint8 \\[N,H,W\\]"):
        FashionMNIST(tmp_path)
