"""Distillation losses: soft cross-entropy against teacher probabilities, optionally plus hard labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``-sum_c p(c) * log_softmax(logits)(c)``, computed in float32 (autocast-safe)."""
    if logits.shape != target_probs.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target_probs {tuple(target_probs.shape)} differ")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logp = F.log_softmax(logits.float(), dim=-1)
        loss = -(target_probs.float() * logp).sum(dim=-1)
        return loss.mean()


def distill_loss(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    hard_labels: torch.Tensor | None = None,
    hard_weight: float = 0.0,
) -> torch.Tensor:
    """``(1 - hard_weight) * soft_CE + hard_weight * CE(logits, hard_labels)``; pure soft CE by default."""
    if not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"hard_weight must be in [0, 1], got {hard_weight}")
    soft = soft_cross_entropy(logits, target_probs)
    if hard_weight == 0.0:
        return soft
    if hard_labels is None:
        raise ValueError("hard_weight > 0 needs hard_labels")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        hard = F.cross_entropy(logits.float(), hard_labels.long())
    return (1.0 - hard_weight) * soft + hard_weight * hard
