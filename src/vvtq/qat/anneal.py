"""Confidence-guided annealing (CGA) of the low-bit weights at the end of QAT (Liu et al., *Oscillation-free
Quantization for Low-bit Vision Transformers*, ICML 2023, §4.3; docs/METHOD.md §6).

A latent weight ``w`` with step ``s`` and offset ``beta`` sits at ``u = clamp((w - beta) / s, Qn, Qp)`` in step
units. Its distance to the nearest rounding threshold is its confidence:

    d = 0.5 - |u - round(u)|          (0 on a threshold, 0.5 on a level or beyond the clipping range)

From ``start_frac`` of training on, a band shrinks along a cosine from half a step to zero at the last step,

    b(t) = 0.25 * (1 + cos(pi * (t - t0) / (T - t0))),     t0 = floor(start_frac * T),

and only the unconfident weights (``d < b(t)``, near a threshold) keep training: every other low-bit weight is
held for that step (its gradient is zeroed, and its value is written back after the optimizer step, so neither
Adam's momentum nor weight decay moves it). The confident weights thus stop first, the ones that would oscillate
settle last, and by the last step every code is fixed. The mask depends on the step and the current weights
only, so a resumed run needs no extra state. Step sizes keep training; 8-bit layers are left alone.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import Lever, LeverSettings, RunContext, register_lever

__all__ = ["AnnealSettings", "ConfidenceAnnealer"]


@dataclass
class AnnealSettings(LeverSettings):
    """Recipe setting ``anneal``: ``start_frac``, where the band starts to shrink, in [0, 1); weights of at most
    ``max_bits`` bits are annealed (default 7: every layer below 8 bits)."""

    order = 20  # its write-back comes before oscillation is measured

    start_frac: float = 0.9
    max_bits: int = 7

    def validate(self) -> None:
        if not 0.0 <= self.start_frac < 1.0:
            raise ValueError(f"anneal start_frac must be in [0, 1); got {self.start_frac}")
        if isinstance(self.max_bits, bool) or not isinstance(self.max_bits, int) or not 2 <= self.max_bits <= 8:
            raise ValueError(f"anneal max_bits must be an integer in 2..8; got {self.max_bits!r}")

    def build(self, ctx: RunContext) -> ConfidenceAnnealer:
        return ConfidenceAnnealer(ctx.model, ctx.total_steps, self.start_frac, self.max_bits)


class ConfidenceAnnealer(Lever):
    """Holds the confident low-bit weights still, step by step, from ``start_frac`` of training to the end.

    Args:
        model_or_pairs: a converted model, or ``(module, weight quantizer)`` pairs.
        total_steps: the run's optimizer steps T.
        start_frac, max_bits: see ``AnnealSettings``.

    Hooks: :meth:`after_backward` between ``backward`` and ``optimizer.step`` (before gradient clipping, so held
    weights do not count in the norm) and :meth:`after_step` right after ``optimizer.step``.
    """

    name = "anneal"

    def __init__(self, model_or_pairs: nn.Module | Iterable[tuple[nn.Module, Any]], total_steps: int,
                 start_frac: float = 0.9, max_bits: int = 7) -> None:
        AnnealSettings(start_frac, max_bits).validate()
        if isinstance(model_or_pairs, nn.Module):
            from ..quant import iter_weight_quantizers

            model_or_pairs = iter_weight_quantizers(model_or_pairs)
        self.pairs = [(m, q) for m, q in model_or_pairs if q.enabled and q.bits <= max_bits]
        self.total_steps, self.start_frac, self.max_bits = max(int(total_steps), 1), start_frac, max_bits
        self.start = int(start_frac * self.total_steps)
        self._held: list[tuple[Tensor, Tensor, Tensor]] = []
        self._band, self._held_count = 0.5, 0
        self._numel = sum(m.weight.numel() for m, _ in self.pairs)

    def band(self, step: int) -> float:
        """The half-width b(t) in steps: 0.5 before ``start``, then a cosine down to 0 at the last step."""
        if step < self.start:
            return 0.5
        span = max(self.total_steps - 1 - self.start, 1)
        return 0.25 * (1.0 + math.cos(math.pi * min((step - self.start) / span, 1.0)))

    @staticmethod
    def confidence(w: Tensor, quantizer: Any) -> Tensor:
        """``d = 0.5 - |u - round(u)|`` with ``u`` the clipped latent weight in step units (no gradient)."""
        w = w.detach().float()
        offset = quantizer.expanded_offset(w)
        if offset is not None:
            w = w - offset.detach()
        u = (w / quantizer.expanded_scale(w).detach()).clamp(quantizer.qmin, quantizer.qmax)
        return 0.5 - (u - torch.round(u)).abs()

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Zero the gradient of every weight to hold at ``step`` and remember its value."""
        self._held, self._held_count = [], 0
        if step < self.start:
            self._band = 0.5
            return
        self._band = b = self.band(step)
        for module, q in self.pairs:
            w = module.weight
            hold = self.confidence(w, q) >= b
            if w.grad is not None:
                w.grad.masked_fill_(hold, 0.0)
            self._held.append((w, hold, w.detach()[hold]))  # boolean indexing copies
            self._held_count += int(hold.sum())

    @torch.no_grad()
    def after_step(self, step: int = 0) -> None:
        """Write the held weights back to their values before the optimizer step."""
        for w, hold, value in self._held:
            w.data[hold] = value
        self._held = []

    def metrics(self, prefix: str = "cga/") -> dict[str, float]:
        """The band of the last step and the fraction of the annealed weights it held."""
        return {f"{prefix}band": self._band, f"{prefix}held": self._held_count / self._numel if self._numel else 0.0}


register_lever("anneal", AnnealSettings)
