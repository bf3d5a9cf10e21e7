"""The device and the process group: which device a run uses, and its rank among ``torchrun`` processes.

A single process is rank 0 of 1. Under ``torchrun`` (``WORLD_SIZE`` > 1) the group is joined with gloo on the CPU
and nccl on CUDA. Evaluation, analysis and export use these too, so they sit below the training loop.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: this rank's CUDA device if there is one, else the CPU; otherwise the device named
    (``ConfigError`` for a name torch does not know, or a CUDA device on a machine without one)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {name!r}: {' '.join(str(exc).split())[:200]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device is available here (use auto or cpu)")
    return device


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the ``torchrun`` process group if there is one; return (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (the model itself when there is none)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def global_mean(value: Tensor) -> float:
    """The mean of a scalar over the ranks (the value itself in one process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def all_reduce_sum(stats: Tensor, device: torch.device) -> Tensor:
    """``stats`` summed over the ranks (on the CPU); unchanged in one process. nccl reduces device tensors."""
    if not dist.is_initialized():
        return stats
    stats = stats.to(device)
    dist.all_reduce(stats)
    return stats.cpu()
