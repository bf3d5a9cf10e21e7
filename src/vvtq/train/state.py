"""The error that stops a run, and the check that every rank calibrated the same quantizer scales."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import VVTQError


class TrainingError(VVTQError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def check_replicas_agree(model: nn.Module) -> list[float]:
    """A digest of every quantizer scale and offset on each rank; raises if the replicas differ."""
    from ..quant import iter_quantizers

    digest = torch.zeros((), dtype=torch.float64)
    for i, q in enumerate(iter_quantizers(model)):
        for p in (q.scale, q.offset):
            if p is not None:
                digest += (p.detach().double().cpu() * (1 + (i % 97) / 97)).sum()
    if not dist.is_initialized():
        return [digest.item()]
    digest = digest.to(next(model.parameters()).device)  # nccl gathers device tensors
    gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    values = [g.item() for g in gathered]
    if any(v != values[0] for v in values):
        raise TrainingError(f"quantizer scales differ between ranks after calibration: {values}")
    return values
