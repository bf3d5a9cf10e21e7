"""Optimisation: AdamW parameter groups (weights, no-decay tensors, quantizer step sizes) and the lr schedule."""
from __future__ import annotations

import math
from typing import Any

from torch import nn


def param_groups(model: nn.Module, weight_decay: float, quant_lr_scale: float = 1.0,
                 weight_quant_lr_scale: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, embeddings, tokens, step sizes and offsets.

    The quantizers' step sizes and offsets form their own groups, whose lr is ``quant_lr_scale`` times the
    weights' (``lr_mult``); the weight quantizers' step sizes take ``weight_quant_lr_scale`` when it is given
    (0 keeps them at their MSE fit). Adam normalises every update, so LSQ's gradient scale does not slow a step
    size down: at the weights' lr a step size of 0.01 moves by several percent a step.
    """
    from ..quant.quantizers import Quantizer

    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    owner = {id(p): m.is_weight for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    decay, no_decay, act_q, weight_q = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in owner:
            (weight_q if owner[id(p)] else act_q).append(p)
        elif p.ndim <= 1 or name in skip or name.split(".")[-1] in skip or "relative_position_bias_table" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    w_scale = quant_lr_scale if weight_quant_lr_scale is None else weight_quant_lr_scale
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    for params, mult in ((act_q, quant_lr_scale), (weight_q, w_scale)):
        if params:
            groups.append({"params": params, "weight_decay": 0.0, "lr_mult": mult})
    return groups


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p))
