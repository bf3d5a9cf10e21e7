"""The common image-dataset interface shared by every data source."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import VVTQError

IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)


class DatasetError(VVTQError, ValueError):
    """A dataset is missing, empty or corrupt (the message names the path)."""


class ImageDataset(ABC):
    """Random-access labelled images; ``get_image(i)`` is float32 ``[C, H, W]`` in ``[0, 1]``."""

    #: short source name, e.g. ``"fashion_mnist"`` or ``"image_folder"``
    name: str = "images"
    #: the split this dataset holds (``"train"``, ``"val"``, ``"test"``)
    split: str = "train"
    #: where the data came from (a directory) or ``""``
    root: str = ""
    #: per-channel normalisation statistics suited to this source
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    #: training images put aside before these (``holdout_split``); 0 when none were
    holdout: int = 0
    #: the split a training set is validated on (``train_val_datasets`` sets it), None where unknown
    val_split: str | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def classes(self) -> list[str]:
        """Class names, index = label."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    @abstractmethod
    def in_chans(self) -> int:
        """Number of image channels (1 or 3)."""

    @abstractmethod
    def get_image(self, i: int) -> torch.Tensor:
        """The full image ``i`` as float32 ``[C, H, W]`` in ``[0, 1]``."""

    @abstractmethod
    def get_label(self, i: int) -> int:
        """The class index of image ``i``."""

    def labels(self) -> list[int]:
        """All labels in order (subclasses override with a cheap version)."""
        return [self.get_label(i) for i in range(len(self))]

    def fingerprint(self) -> str:
        """A short hash of the image count and labels, identifying this exact list of images."""
        h = hashlib.sha256()
        h.update(f"{len(self)}:{self.num_classes}:".encode())
        h.update(",".join(map(str, self.labels())).encode())
        return h.hexdigest()[:16]

    @property
    def source(self) -> str:
        """The name ``build_dataset`` builds this data from (with ``root``), e.g. ``"fashion_mnist"``."""
        return self.name

    def identity(self) -> dict[str, Any]:
        """What soft-label files and model specs record to recognise this dataset later: its name, root, split,
        size and fingerprint, and how to rebuild it (``data``: the ``build_dataset`` name, ``holdout``,
        ``val_split``)."""
        return {
            "name": self.name,
            "root": self.root,
            "split": self.split,
            "num_images": len(self),
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "fingerprint": self.fingerprint(),
            "data": self.source,
            "holdout": int(self.holdout),
            "val_split": self.val_split,
        }

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        return i % n

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, root={self.root!r}, "
            f"n={len(self)}, classes={self.num_classes}, in_chans={self.in_chans})"
        )


class ArrayImageDataset(ImageDataset):
    """Images held in memory as a uint8 (or float in [0,1]) tensor ``[N, H, W]`` or ``[N, C, H, W]``."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        classes: Sequence[str] | None = None,
        *,
        name: str = "array",
        split: str = "train",
        root: str = "",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4:
            raise ValueError(f"images must be [N,H,W] or [N,C,H,W], got shape {tuple(images.shape)}")
        labels_t = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels_t.numel() != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels_t.numel()} labels")
        if classes is None:
            n_cls = int(labels_t.max()) + 1 if labels_t.numel() else 0
            classes = [str(c) for c in range(n_cls)]
        if labels_t.numel() and (int(labels_t.min()) < 0 or int(labels_t.max()) >= len(classes)):
            raise ValueError(f"labels must lie in [0, {len(classes)})")
        self.images = images
        self.label_tensor = labels_t
        self._classes = list(classes)
        self.name, self.split, self.root = name, split, root
        c = images.shape[1]
        default_mean = FASHION_MNIST_MEAN * c if c == 1 else IMAGENET_MEAN if c == 3 else (0.5,) * c
        default_std = FASHION_MNIST_STD * c if c == 1 else IMAGENET_STD if c == 3 else (0.5,) * c
        self.mean = tuple(float(m) for m in (mean if mean is not None else default_mean))
        self.std = tuple(float(s) for s in (std if std is not None else default_std))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def classes(self) -> list[str]:
        return self._classes

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    def get_image(self, i: int) -> torch.Tensor:
        x = self.images[self._check_index(i)]
        if x.dtype == torch.uint8:
            return x.to(torch.float32).div_(255.0)
        return x.to(torch.float32).clone()

    def get_label(self, i: int) -> int:
        return int(self.label_tensor[self._check_index(i)])

    def labels(self) -> list[int]:
        return self.label_tensor.tolist()


class SubsetImageDataset(ImageDataset):
    """A view of some images of another dataset (e.g. the first N for a quick run)."""

    def __init__(self, base: ImageDataset, indices: Sequence[int]) -> None:
        n = len(base)
        idx = [int(i) for i in indices]
        if any(not 0 <= i < n for i in idx):
            raise IndexError(f"subset indices must lie in [0, {n})")
        self.base, self.indices = base, idx
        self.split, self.mean, self.std = base.split, base.mean, base.std
        self.name = f"{base.name}[subset]"
        self.root, self.holdout, self.val_split = base.root, base.holdout, base.val_split

    @property
    def source(self) -> str:
        return self.base.source

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def classes(self) -> list[str]:
        return self.base.classes

    @property
    def in_chans(self) -> int:
        return self.base.in_chans

    def get_image(self, i: int) -> torch.Tensor:
        return self.base.get_image(self.indices[self._check_index(i)])

    def get_label(self, i: int) -> int:
        return self.base.get_label(self.indices[self._check_index(i)])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.base.fingerprint().encode())
        h.update(",".join(map(str, self.indices)).encode())
        return h.hexdigest()[:16]
