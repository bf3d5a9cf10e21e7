"""The protocol of everything that acts during QAT, and the registry of the optional levers.

A *lever* is a small object with the hooks the training loop calls at fixed points of every step:

    loss(step, out)        a term added to the loss (or, for the targets, the task loss itself), or None
    after_backward(step)   gradients exist, not yet clipped (annealing holds weights here)
    after_step(step)       right after the optimizer step (oscillation tracking, annealing's write-back)
    metrics()              values for the step's log record
    state_dict() / load_state_dict(state)   what a checkpoint must carry for an exact resume

Each lever has a typed settings class (``Settings``) whose ``build(ctx)`` makes the lever for one run. The
optional levers are registered under the name of their recipe setting (``register_lever``); the loop builds
every one the recipe sets, after the targets, in the order its settings class gives. Adding a lever is one file with one
settings class and one lever class, and one ``register_lever`` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..settings import Settings


@dataclass
class StepOutputs:
    """What one step's loss is computed from: the student's logits on the crops ``x`` with labels ``y``, and
    the whole batch as the loader gave it (replayed soft labels ride in it)."""

    logits: Tensor
    x: Tensor
    y: Tensor
    batch: tuple[Tensor, ...]


@dataclass
class RunContext:
    """What a lever may need to be built: the model being trained (unwrapped), the run's steps, its device, the
    recipe (``TrainConfig``), the training images and the model's architecture options."""

    model: nn.Module
    total_steps: int
    device: Any
    cfg: Any
    train_set: Any = None
    model_kwargs: dict[str, Any] | None = None


class Lever:
    """A lever's hooks; each does nothing unless a lever overrides it."""

    #: the recipe setting this lever is built from (also its key in checkpoint metadata)
    name: str = ""

    def loss(self, step: int, out: StepOutputs) -> Tensor | None:
        return None

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """``{"meta": JSON-able, "tensors": {name: Tensor}}``, or ``{}`` for a lever with no state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LeverSettings(Settings):
    """Settings of a lever: ``build`` makes it for one run. ``qat_only`` levers act on quantized weights; the loop
    calls the levers' hooks in increasing ``order`` (ties: registration order)."""

    qat_only = True
    order = 50

    def build(self, ctx: RunContext) -> Lever:
        raise NotImplementedError


#: recipe setting name -> settings class
LEVERS: dict[str, type[LeverSettings]] = {}
#: names a lever cannot take: the recipe's other settings and the keys of checkpoint metadata, where a lever's
#: state is stored under its name
RESERVED = frozenset({
    "teacher", "quant", "levers", "model", "model_kwargs", "data", "dataset", "classes", "img_size", "mean", "std",
    "history", "step", "epoch", "best_acc", "epoch_loss", "train_config", "format", "version", "optimizer", "extra"})


def register_lever(name: str, settings: type[LeverSettings]) -> type[LeverSettings]:
    """Make ``name`` a recipe setting whose mapping is read as ``settings`` and built into a lever (named
    ``name`` in the run's metrics and checkpoints)."""
    if not name.isidentifier() or name in RESERVED:
        raise ValueError(f"a lever's setting name must be an identifier other than {sorted(RESERVED)}; got {name!r}")
    LEVERS[name] = settings
    return settings
