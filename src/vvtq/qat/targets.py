"""What the student learns from: hard labels, a live teacher's probabilities, or a soft-label file (FKD).

The recipe setting ``teacher`` (``TeacherSettings``) picks one. Its lever gives the run its training views (the
random multi-crop views, or the crops stored in the soft-label file, replayed with their labels) and the task
loss of each step:

    none:  CE(student(crops), y) with label smoothing
    live:  (1 - h) * soft_CE(student(crops), teacher(crops)) + h * CE(student(crops), y)
    file:  the same, with the teacher's probabilities read from the file for exactly these crops

Multi-crop distillation: VVTQ (Huang et al., TMLR 2024, §3.3) after FKD (Shen & Xing, ECCV 2022).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..data import MultiCropDataset, multicrop_collate
from ..distill import distill_loss
from .base import Lever, LeverSettings, RunContext, StepOutputs

__all__ = ["HardLabels", "LiveTeacher", "SoftLabelFile", "TeacherSettings", "Targets"]

SOURCES = ("none", "live", "file")


@dataclass
class TeacherSettings(LeverSettings):
    """Recipe setting ``teacher``: ``source`` none (hard labels), live (``checkpoint``: an FP checkpoint,
    ``timm:NAME``, or a list of them whose probabilities are averaged) or file (``softlabels``: made by
    ``vvtq softlabels``); ``hard_weight`` mixes in the hard label's CE."""

    ALWAYS = ("source",)
    qat_only = False
    source: str = "none"
    checkpoint: str | list[str] | None = None
    softlabels: str | None = None
    hard_weight: float = 0.0

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"teacher.source must be none, live or file; got {self.source!r}")
        if not 0.0 <= self.hard_weight <= 1.0:
            raise ValueError(f"teacher.hard_weight must be in [0, 1]; got {self.hard_weight}")
        unused = [k for k in ("checkpoint", "softlabels") if getattr(self, k)]
        if self.source == "none" and unused:
            raise ValueError(f"teacher.{unused[0]} is set but teacher.source is none (hard labels), so it would be "
                             "ignored: set teacher.source to live (a checkpoint) or file (soft labels), or drop it")
        if self.source == "live" and not self.checkpoint:
            raise ValueError("teacher.source=live needs teacher.checkpoint")
        if self.source == "file" and not self.softlabels:
            raise ValueError("teacher.source=file needs teacher.softlabels (made by `vvtq softlabels`)")

    @property
    def distils(self) -> bool:
        """Whether the student learns from a teacher's probabilities (live or from a file)."""
        return self.source != "none"

    def build(self, ctx: RunContext) -> Targets:
        if self.source == "live":
            return LiveTeacher(ctx, self)
        if self.source == "file":
            return SoftLabelFile(ctx, self)
        return HardLabels(ctx, self)


class Targets(Lever):
    """The lever that gives the task loss and the training views; the loop holds exactly one."""

    name = "teacher"
    collate: Callable[..., Any] = staticmethod(multicrop_collate)

    def __init__(self, ctx: RunContext, settings: TeacherSettings):
        self.ctx, self.settings = ctx, settings

    def views(self, num_crops: int) -> Dataset:
        """The training images as ``num_crops`` random crops each (seeded by (seed, epoch, image))."""
        cfg = self.ctx.cfg
        return MultiCropDataset(self.ctx.train_set, num_crops, cfg.img_size, tuple(cfg.crop_scale), seed=cfg.seed,
                                translate=cfg.crop_translate)


class HardLabels(Targets):
    """Cross-entropy on the labels, with the recipe's label smoothing."""

    def loss(self, step: int, out: StepOutputs) -> Tensor:
        return F.cross_entropy(out.logits.float(), out.y, label_smoothing=self.ctx.cfg.label_smoothing)


class LiveTeacher(Targets):
    """A frozen FP teacher (or the mean of several) run on the student's own crops."""

    def __init__(self, ctx: RunContext, settings: TeacherSettings):
        super().__init__(ctx, settings)
        from ..modelio import load_teacher

        self.teacher = load_teacher(settings.checkpoint, ctx.model_kwargs or {}, ctx.device)

    def loss(self, step: int, out: StepOutputs) -> Tensor:
        with torch.no_grad():
            target = self.teacher(out.x)
        return distill_loss(out.logits, target, out.y, self.settings.hard_weight)


class SoftLabelFile(Targets):
    """The crops stored in a soft-label file, replayed with the teacher's probabilities for each."""

    def __init__(self, ctx: RunContext, settings: TeacherSettings):
        super().__init__(ctx, settings)
        from ..distill.replay import replay_collate

        self.collate = replay_collate

    def views(self, num_crops: int) -> Dataset:
        from ..distill.replay import ReplayCropDataset

        cfg = self.ctx.cfg
        return ReplayCropDataset(self.ctx.train_set, self.settings.softlabels, num_crops, cfg.img_size,
                                 seed=cfg.seed)

    def loss(self, step: int, out: StepOutputs) -> Tensor:
        return distill_loss(out.logits, out.batch[4].to(out.logits.device), out.y, self.settings.hard_weight)
