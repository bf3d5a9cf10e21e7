"""Datasets (Fashion-MNIST, image folders), replayable multi-crop views and normalisation."""

from __future__ import annotations

from pathlib import Path

from vvtq.data.base import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArrayImageDataset,
    DatasetError,
    ImageDataset,
    SubsetImageDataset,
)
from vvtq.data.fashion_mnist import (
    DEFAULT_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    load_fashion_mnist_arrays,
    read_idx,
    write_idx,
)
from vvtq.data.folder import IMAGE_EXTENSIONS, ImageFolderDataset, find_classes
from vvtq.data.multicrop import (
    EvalDataset,
    MultiCropDataset,
    multicrop_collate,
)
from vvtq.data.transforms import (
    CropBox,
    apply_crop,
    box_to_pixels,
    boxes_to_tensor,
    item_generator,
    item_seed,
    normalize,
    resize_full,
    sample_crop,
)

FASHION_MNIST_NAMES = ("fashion_mnist", "fashion-mnist", "fashionmnist", "fmnist")


def build_dataset(name_or_path: str, split: str = "train", root: str | None = None) -> ImageDataset:
    """Build a dataset: ``"fashion_mnist"`` (IDX files under ``root``, default Debian's directory) or an
    image-folder root holding ``<split>/<class>/<image>``.

    ``"image_folder"``/``"folder"`` with ``root`` also selects an image folder.
    """
    key = name_or_path.strip().lower()
    if key in FASHION_MNIST_NAMES:
        return FashionMNIST(root, split)
    if key in ("image_folder", "imagefolder", "folder"):
        if root is None:
            raise DatasetError(f"dataset {name_or_path!r} needs root=<directory with {split}/<class>/...>")
        return ImageFolderDataset(root, split)
    path = Path(name_or_path)
    if not path.is_dir():
        raise DatasetError(
            f"unknown dataset {name_or_path!r}: not 'fashion_mnist' and no image folder at {path}"
        )
    return ImageFolderDataset(path, split)


__all__ = [
    "DEFAULT_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_NAMES",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "CropBox",
    "DatasetError",
    "EvalDataset",
    "FashionMNIST",
    "ImageDataset",
    "ImageFolderDataset",
    "MultiCropDataset",
    "SubsetImageDataset",
    "apply_crop",
    "box_to_pixels",
    "boxes_to_tensor",
    "build_dataset",
    "find_classes",
    "item_generator",
    "item_seed",
    "load_fashion_mnist_arrays",
    "multicrop_collate",
    "normalize",
    "read_idx",
    "resize_full",
    "sample_crop",
    "write_idx",
]
