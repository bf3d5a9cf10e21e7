"""The training images and their batches: the recipe's train / validation sets, and a sampler whose batches are a
function of (seed, epoch), split over the ranks so that their union is the single-process batch."""
from __future__ import annotations

import torch

from ..data import ImageDataset, SubsetImageDataset
from ..data.splits import train_val_datasets
from ..errors import ConfigError
from .config import TrainConfig


def training_datasets(cfg: TrainConfig) -> tuple[ImageDataset, ImageDataset]:
    """The recipe's (training, validation) images, cut to ``train_subset`` / ``val_subset`` when set."""
    train, val = train_val_datasets(cfg.data, cfg.data_root, cfg.val_split, cfg.holdout)
    if cfg.train_subset:
        train = SubsetImageDataset(train, range(min(cfg.train_subset, len(train))))
    if cfg.val_subset:
        val = SubsetImageDataset(val, range(min(cfg.val_subset, len(val))))
    return train, val


class ImageBatchSampler:
    """Batches of image indices: a seeded permutation per epoch, cut into global batches of ``images`` images,
    each split into ``world`` contiguous parts (rank r takes part r). All K crops of an image stay together, and
    the union of the ranks' parts is exactly the single-process batch."""

    def __init__(self, num_images: int, images: int, rank: int = 0, world: int = 1, seed: int = 0):
        if images % world:
            raise ConfigError(f"{images} images per batch cannot be split over {world} processes")
        self.n, self.images, self.rank, self.world, self.seed = num_images, images, rank, world, seed
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.n // self.images - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        part = self.images // self.world
        for b in range(self.start, self.n // self.images):
            chunk = perm[b * self.images:(b + 1) * self.images]
            yield chunk[self.rank * part:(self.rank + 1) * part].tolist()

