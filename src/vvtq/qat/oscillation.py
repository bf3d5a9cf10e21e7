"""Oscillation tracking and iterative freezing during QAT (Nagel et al., *Overcoming Oscillations in
Quantization-Aware Training*, ICML 2022, §4): the lever around ``vvtq.analysis.oscillation.OscillationTracker``.

After every optimizer step the tracker compares each low-bit weight's integer code with the last one; an EMA of
the sign flips is its oscillation frequency. With ``freeze_threshold`` set, weights that oscillate more often are
frozen at their EMA code. The tracker's state (its EMAs and frozen masks) travels in the checkpoint, so a resumed
run freezes exactly what the uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..analysis.oscillation import OscillationTracker
from .base import Lever, LeverSettings, RunContext, register_lever

__all__ = ["OscillationLever", "OscillationSettings"]


@dataclass
class OscillationSettings(LeverSettings):
    """Recipe setting ``oscillation``: EMA ``momentum`` of the flip frequency, the ``threshold`` above which a
    weight counts as oscillating, ``freeze_threshold`` (null: track only) and ``every`` (compare codes every
    ``every`` steps)."""

    order = 30  # measures the weights as the step left them

    momentum: float = 0.01
    threshold: float = 0.005
    freeze_threshold: float | None = None
    every: int = 1

    def validate(self) -> None:
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")

    def build(self, ctx: RunContext) -> OscillationLever:
        return OscillationLever(OscillationTracker(ctx.model, self.momentum, self.threshold, self.freeze_threshold,
                                                   self.every))


class OscillationLever(Lever):
    """Updates the tracker after each optimizer step; logs ``osc/*``; checkpoints its state."""

    name = "oscillation"

    def __init__(self, tracker: OscillationTracker):
        self.tracker = tracker

    def after_step(self, step: int) -> None:
        self.tracker.step()

    def metrics(self) -> dict[str, float]:
        return self.tracker.metrics()

    def state_dict(self) -> dict[str, Any]:
        """The tracker's counters as metadata and its per-layer tensors named ``osc.<layer>.<key>``."""
        state = self.tracker.state_dict()
        meta = {k: v for k, v in state.items() if k != "layers"}
        meta["layers"] = {layer: sorted(d) for layer, d in state["layers"].items()}
        tensors = {f"osc.{layer}.{key}": t for layer, d in state["layers"].items() for key, t in d.items()}
        return {"meta": meta, "tensors": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta, tensors = state["meta"], state["tensors"]
        layers = {layer: {key: tensors[f"osc.{layer}.{key}"] for key in keys} for layer, keys in meta["layers"].items()}
        self.tracker.load_state_dict({**{k: v for k, v in meta.items() if k != "layers"}, "layers": layers})


register_lever("oscillation", OscillationSettings)
