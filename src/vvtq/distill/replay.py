"""Multi-crop views replayed from a soft-label file: the stored crops of each image and their teacher targets.

Data flows one way: this module reads ``vvtq.data`` (images, crops, generator streams) and the soft-label file,
and nothing in ``vvtq.data`` imports ``vvtq.distill``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from vvtq.data.base import ImageDataset
from vvtq.data.multicrop import STREAM_REPLAY_PICK, multicrop_collate
from vvtq.data.transforms import CropBox, apply_crop, item_generator, normalize
from vvtq.distill.softlabels import SoftLabelFile, expand_probs


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
