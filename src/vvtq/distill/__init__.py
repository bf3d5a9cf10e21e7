"""Knowledge distillation: soft cross-entropy losses, precomputed (FKD-style) soft-label files and their replay."""

from vvtq.distill.losses import distill_loss, soft_cross_entropy
from vvtq.distill.replay import ReplayCropDataset, replay_collate
from vvtq.distill.softlabels import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SoftLabelError,
    SoftLabelFile,
    expand_probs,
    generate_softlabels,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ReplayCropDataset",
    "SoftLabelError",
    "SoftLabelFile",
    "distill_loss",
    "expand_probs",
    "generate_softlabels",
    "replay_collate",
    "soft_cross_entropy",
]
