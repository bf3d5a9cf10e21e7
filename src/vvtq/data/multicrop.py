"""Multi-crop training views (K crops of each image in one batch), evaluation views and soft-label replay."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from vvtq.data.base import ImageDataset
from vvtq.data.transforms import CropBox, apply_crop, boxes_to_tensor, item_generator, normalize, sample_crop

if TYPE_CHECKING:
    from vvtq.distill.softlabels import SoftLabelFile

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
    ) -> None:
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        self.base, self.num_crops, self.out_size = base, int(num_crops), int(out_size)
        self.scale, self.ratio, self.seed, self.flip_prob = tuple(scale), tuple(ratio), int(seed), flip_prob
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
            sample_crop(g, self.scale, self.ratio, image_aspect=image_aspect, flip_prob=self.flip_prob)
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


class ReplayCropDataset(Dataset):
    """Multi-crop views replayed from a soft-label file: K of the M stored crops of each image.

    Item ``i``: ``(crops [K,C,S,S], label, boxes [K,5], i, target_probs [K, num_classes])``. The chosen crops
    are random per (seed, epoch, i); target probabilities are rebuilt from the stored top-k with marginal
    smoothing. ``out_size`` defaults to the size the teacher saw (then crops are pixel-identical to its
    inputs).
    """

    def __init__(
        self,
        base: ImageDataset,
        softlabel_file: str | os.PathLike | SoftLabelFile,
        num_crops: int = 1,
        out_size: int | None = None,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        validate: bool = True,
    ) -> None:
        from vvtq.distill.softlabels import SoftLabelFile

        sl = softlabel_file if isinstance(softlabel_file, SoftLabelFile) else SoftLabelFile(softlabel_file)
        if validate:
            sl.validate(base, base.num_classes)
        if not 1 <= num_crops <= sl.num_crops:
            raise ValueError(
                f"num_crops must be in [1, {sl.num_crops}] (crops stored per image), got {num_crops}"
            )
        self.base, self.softlabels, self.num_crops, self.seed = base, sl, int(num_crops), int(seed)
        self.out_size = int(sl.out_size if out_size is None else out_size)
        self.mean = tuple(base.mean if mean is None else mean)
        self.std = tuple(base.std if std is None else std)
        self.num_classes = base.num_classes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose crop picks items return."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def pick(self, index: int) -> torch.Tensor:
        """Which of the M stored crops image ``index`` uses this epoch (``[K]`` long)."""
        g = item_generator(self.seed, self.epoch, index, STREAM_REPLAY_PICK)
        return torch.randperm(self.softlabels.num_crops, generator=g)[: self.num_crops]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, int, torch.Tensor]:
        from vvtq.distill.softlabels import expand_probs

        index = int(index)
        sel = self.pick(index)
        boxes_all, idx_all, prob_all = self.softlabels.get(index)
        boxes, topk_idx, topk_prob = boxes_all[sel], idx_all[sel], prob_all[sel]
        img = self.base.get_image(index)
        crops = torch.stack([apply_crop(img, CropBox.from_tensor(b), self.out_size) for b in boxes])
        target = expand_probs(topk_idx, topk_prob, self.num_classes)
        return normalize(crops, self.mean, self.std), self.base.get_label(index), boxes, index, target


def replay_collate(
    batch: Sequence[tuple[torch.Tensor, int, torch.Tensor, int, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten to ``(x [B*K,C,S,S], y [B*K], boxes [B*K,5], idx [B*K], target_probs [B*K, num_classes])``."""
    x, y, boxes, idx = multicrop_collate([b[:4] for b in batch])
    return x, y, boxes, idx, torch.cat([b[4] for b in batch])
