"""ImageNet-style image folders: ``root/<split>/<class>/*.jpg``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vvtq.data.base import IMAGENET_MEAN, IMAGENET_STD, DatasetError, ImageDataset

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".ppm",
    ".pgm",
    ".webp",
    ".tif",
    ".tiff",
)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_classes(split_dir: str | os.PathLike) -> list[str]:
    """Sorted class sub-directory names of ``split_dir``."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetError(f"image folder {split_dir} not found")
    classes = _class_dirs(split_dir)
    if not classes:
        raise DatasetError(f"image folder {split_dir} has no class sub-directories")
    return classes


def _in_loader_worker() -> bool:
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


class ImageFolderDataset(ImageDataset):
    """Images under ``root/<split>/<class>/``, classes sorted, loaded with PIL as RGB (``in_chans`` = 3).

    When ``classes`` is not given and ``root/train`` exists, the class list comes from ``root/train`` so that
    label indices of every split agree with training.

    Decoded images are kept in memory (uint8) up to ``cache_bytes`` (default 2 GiB), so that each file is
    decoded once per process: on CIFAR-10's 32 px JPEGs decoding costs about 5x the crop (336 vs 63 us an image
    here), and the 50,000 decoded images take 150 MB. Past the budget, images are decoded each time they are read,
    which is the right trade for an ImageNet-size folder. ``cache_bytes=0`` turns the cache off. DataLoader
    workers do not cache (each would hold its own copy, and the loop's workers end with their epoch).
    """

    #: default in-memory budget for decoded images
    DEFAULT_CACHE_BYTES = 2 << 30

    name = "image_folder"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        root_p = Path(root)
        if not root_p.is_dir():
            raise DatasetError(f"image folder root {root_p} not found")
        split_dir = root_p / split
        if not split_dir.is_dir():
            raise DatasetError(
                f"image folder {split_dir} not found (expected {root_p}/{split}/<class>/<image>)"
            )
        if classes is None:
            train_dir = root_p / "train"
            classes = find_classes(train_dir if train_dir.is_dir() else split_dir)
        classes = list(classes)
        exts = tuple(e.lower() for e in extensions)
        files: list[str] = []
        labels: list[int] = []
        for ci, cname in enumerate(classes):
            cdir = split_dir / cname
            if not cdir.is_dir():
                continue
            found = sorted(
                str(p.relative_to(split_dir))
                for p in cdir.rglob("*")
                if p.suffix.lower() in exts and p.is_file()
            )
            files.extend(found)
            labels.extend([ci] * len(found))
        if not files:
            raise DatasetError(f"image folder {split_dir} contains no images with extensions {exts}")
        extra = sorted(set(_class_dirs(split_dir)) - set(classes))
        if extra:
            raise DatasetError(
                f"image folder {split_dir} has class directories {extra[:5]} unknown to the class list"
            )
        self.root = str(root_p.resolve())
        self.split = split
        self.split_dir = split_dir
        self.files = files
        self.label_array = np.asarray(labels, dtype=np.int64)
        self._classes = classes
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.files)

    @property
    def classes(self) -> list[str]:
        return self._classes

    @property
    def in_chans(self) -> int:
        return 3

    def path(self, i: int) -> Path:
        """The file of image ``i``."""
        return self.split_dir / self.files[self._check_index(i)]

    def get_image(self, i: int) -> torch.Tensor:
        i = self._check_index(i)
        pixels = self._cache.get(i)
        if pixels is None:
            pixels = self._decode(i)
            if self._cached_bytes + pixels.numel() <= self.cache_bytes and not _in_loader_worker():
                self._cache[i] = pixels
                self._cached_bytes += pixels.numel()
        return pixels.to(torch.float32).div_(255.0)

    def _decode(self, i: int) -> torch.Tensor:
        """Image ``i`` decoded as uint8 ``[3, H, W]``."""
        from PIL import Image, UnidentifiedImageError

        p = self.path(i)
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DatasetError(f"cannot load image {p}: {e}") from e
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def get_label(self, i: int) -> int:
        return int(self.label_array[self._check_index(i)])

    def labels(self) -> list[int]:
        return self.label_array.tolist()

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"{len(self)}:{self.num_classes}:".encode())
        h.update(
            "\n".join(
                f"{f}\t{lab}" for f, lab in zip(self.files, self.label_array.tolist(), strict=True)
            ).encode()
        )
        return h.hexdigest()[:16]
