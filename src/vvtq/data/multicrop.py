"""Multi-crop training views (K crops of each image in one batch) and evaluation views.

The soft-label replay of stored crops is ``vvtq.distill.replay`` (it reads this module; this one reads no distill).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from vvtq.data.base import ImageDataset
from vvtq.data.transforms import CropBox, apply_crop, boxes_to_tensor, item_generator, normalize, sample_crop

#: generator stream ids, so different consumers of (seed, epoch, index) never share random numbers
STREAM_TRAIN_CROPS = 0
STREAM_SOFTLABEL_CROPS = 1
STREAM_REPLAY_PICK = 2


class MultiCropDataset(Dataset):
    """Item ``i``: ``(crops [K,C,S,S] normalised, label, boxes [K,5], i)``, random per (seed, epoch, i).

    Call :meth:`set_epoch` before each epoch (with ``persistent_workers`` the workers keep the old epoch).
    """

    def __init__(
        self,
        base: ImageDataset,
        num_crops: int = 1,
        out_size: int = 224,
        scale: tuple[float, float] = (0.35, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        flip_prob: float = 0.5,
        translate: float = 0.0,
    ) -> None:
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        self.base, self.num_crops, self.out_size = base, int(num_crops), int(out_size)
        self.scale, self.ratio, self.seed, self.flip_prob = tuple(scale), tuple(ratio), int(seed), flip_prob
        self.translate = float(translate)
        self.mean = tuple(base.mean if mean is None else mean)
        self.std = tuple(base.std if std is None else std)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose crops items return."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def boxes_for(self, index: int, image_aspect: float) -> list[CropBox]:
        """The K boxes of image ``index`` in the current epoch."""
        g = item_generator(self.seed, self.epoch, index, STREAM_TRAIN_CROPS)
        return [
            sample_crop(g, self.scale, self.ratio, image_aspect=image_aspect, flip_prob=self.flip_prob,
                        translate=self.translate)
            for _ in range(self.num_crops)
        ]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, int]:
        index = int(index)
        img = self.base.get_image(index)
        boxes = self.boxes_for(index, img.shape[-1] / img.shape[-2])
        crops = torch.stack([apply_crop(img, b, self.out_size) for b in boxes])
        return (
            normalize(crops, self.mean, self.std),
            self.base.get_label(index),
            boxes_to_tensor(boxes),
            index,
        )


def multicrop_collate(
    batch: Sequence[tuple[torch.Tensor, int, torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten B images x K crops into ``(x [B*K,C,S,S], y [B*K], boxes [B*K,5], idx [B*K])``."""
    crops = [b[0] for b in batch]
    counts = torch.tensor([c.shape[0] for c in crops], dtype=torch.long)
    x = torch.cat(crops)
    y = torch.tensor([int(b[1]) for b in batch], dtype=torch.long).repeat_interleave(counts)
    boxes = torch.cat([b[2] for b in batch])
    idx = torch.tensor([int(b[3]) for b in batch], dtype=torch.long).repeat_interleave(counts)
    return x, y, boxes, idx


class EvalDataset(Dataset):
    """Item ``i``: ``(x [C,S,S], label)``: the whole image resized to ``out_size`` and normalised."""

    def __init__(
        self,
        base: ImageDataset,
        out_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.base, self.out_size = base, int(out_size)
        self.mean = tuple(base.mean if mean is None else mean)
        self.std = tuple(base.std if std is None else std)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.base.get_image(int(index))
        x = apply_crop(img, CropBox.full(), self.out_size)
        return normalize(x, self.mean, self.std), self.base.get_label(int(index))
