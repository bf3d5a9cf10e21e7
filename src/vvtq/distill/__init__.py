"""Knowledge distillation: soft cross-entropy losses and precomputed (FKD-style) soft-label files."""

from vvtq.distill.losses import distill_loss, soft_cross_entropy
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
    "SoftLabelError",
    "SoftLabelFile",
    "distill_loss",
    "expand_probs",
    "generate_softlabels",
    "soft_cross_entropy",
]
