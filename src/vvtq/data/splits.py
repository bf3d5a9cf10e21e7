"""A validation split held out from the training images, so that recipes are chosen without the test set.

``holdout_split(train, n)`` puts ``n`` training images aside, chosen by a fixed permutation (seed 0, the same for
every run and every machine), and returns ``(rest, held_out)``. A recipe with ``holdout: 5000`` trains on the rest
and, with ``val_split: holdout``, is scored on the held-out images; with ``val_split: test`` it trains on the same
rest and is scored on the test set. Teacher and student therefore never train on the images that pick the recipe.
"""
from __future__ import annotations

import torch

from .base import DatasetError, ImageDataset, SubsetImageDataset

HOLDOUT_SPLIT = "holdout"
_PERMUTATION_SEED = 0


def holdout_split(train: ImageDataset, n: int) -> tuple[ImageDataset, ImageDataset]:
    """``(training images, held-out images)``: ``n`` images chosen by a fixed permutation of ``train``."""
    if n <= 0:
        return train, SubsetImageDataset(train, [])
    if n >= len(train):
        raise DatasetError(f"holdout of {n} images leaves none of the {len(train)} training images to train on")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(_PERMUTATION_SEED)).tolist()
    rest, held = sorted(perm[:-n]), sorted(perm[-n:])
    rest_ds, held_ds = SubsetImageDataset(train, rest), SubsetImageDataset(train, held)
    rest_ds.name, held_ds.name = f"{train.name}[train-{n}]", f"{train.name}[holdout-{n}]"
    rest_ds.holdout = held_ds.holdout = n
    held_ds.split = HOLDOUT_SPLIT
    return rest_ds, held_ds


def training_images(data: str, root: str | None, holdout: int) -> ImageDataset:
    """The images a recipe with this ``holdout`` trains on (what its soft-label file must label)."""
    from . import build_dataset

    return holdout_split(build_dataset(data, "train", root), holdout)[0]


def train_val_datasets(data: str, root: str | None, val_split: str, holdout: int,
                       ) -> tuple[ImageDataset, ImageDataset]:
    """The training set (without its held-out images) and the validation set a recipe names."""
    from . import build_dataset

    train, held = holdout_split(build_dataset(data, "train", root), holdout)
    train.val_split = val_split  # recorded in its identity: the model spec says what the model was validated on
    if val_split == HOLDOUT_SPLIT:
        if holdout <= 0:
            raise DatasetError("val_split 'holdout' needs holdout > 0 (the number of training images to hold out)")
        return train, held
    return train, build_dataset(data, val_split, root)


def eval_split(data: str, split: str, root: str | None, holdout: int = 0) -> ImageDataset:
    """The images of ``split``: a dataset split by name, or ``holdout`` (the ``holdout`` held-out images)."""
    if split == HOLDOUT_SPLIT:
        return train_val_datasets(data, root, split, holdout)[1]
    from . import build_dataset

    return build_dataset(data, split, root)
