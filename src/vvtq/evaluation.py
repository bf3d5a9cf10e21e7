"""Evaluation: the loader of an evaluation split and top-1 / mean cross-entropy of a model on it.

Used by training (the validation after each epoch), ``vvtq eval``, analysis and the demo. A quantized model in
eval mode computes in the integer domain (``vvtq.set_integer_eval`` turns that off); under ``torchrun`` each rank
scores its share of the images and the counts are summed.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .data import EvalDataset
from .device import all_reduce_sum


def eval_loader(base: Dataset, img_size: int, batch_size: int = 500, rank: int = 0, world: int = 1) -> DataLoader:
    """Batches of ``(normalised full image resized to img_size, label)`` of ``base`` in order; under ``world``
    processes, rank ``rank`` takes every ``world``-th image."""
    ds: Dataset = EvalDataset(base, img_size)
    if world > 1:
        ds = Subset(ds, range(rank, len(ds), world))
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Top-1 accuracy (%) and mean CE loss, summed over ranks when distributed. bf16 autocast on CUDA."""
    was = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with amp:
            logits = model(x).float()
        stats += torch.tensor([(logits.argmax(1) == y).sum().item(),
                               F.cross_entropy(logits, y, reduction="sum").item(), y.numel()], dtype=torch.float64)
    stats = all_reduce_sum(stats, device)
    model.train(was)
    return {"acc": 100.0 * stats[0].item() / max(stats[2].item(), 1), "loss": stats[1].item() / max(stats[2].item(), 1)}
