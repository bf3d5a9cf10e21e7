"""Test doubles shared by the tests (importable as ``fakes``: pytest puts ``tests/`` on ``sys.path`` for its
``conftest.py``)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class FakeQuantizer(nn.Module):
    """A minimal stand-in for a weight quantizer, with the attributes and methods of the documented interface
    (docs/INTERFACES.md, "Quantizers") that the regularizer and the oscillation tracker use: signed codes,
    one step size for the tensor (a scalar ``scale``) or one per output row (a list), no offset."""

    def __init__(self, bits: int, scale, name: str, enabled: bool = True):
        super().__init__()
        self.bits, self.signed, self.is_weight, self.name, self.kind = bits, True, True, name, "fc1"
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.scale = nn.Parameter(torch.as_tensor(scale, dtype=torch.float32).reshape(-1))
        self.offset = None
        self.granularity = "tensor" if self.scale.numel() == 1 else "channel"
        self.axis, self.num_groups = 0, self.scale.numel()
        self.enabled = enabled

    def expanded_scale(self, x: Tensor) -> Tensor:
        """The step size, broadcastable to ``x`` (rows along axis 0)."""
        if self.scale.numel() == 1:
            return self.scale.reshape(())
        return self.scale.view(-1, *([1] * (x.ndim - 1)))

    def expanded_offset(self, x: Tensor) -> None:
        """No offset: the codes are signed and symmetric."""
        return None

    def codes(self, x: Tensor) -> Tensor:
        """``clamp(round(x / s), qmin, qmax)`` as int32, without grad."""
        with torch.no_grad():
            return torch.clamp(torch.round(x / self.expanded_scale(x)), self.qmin, self.qmax).to(torch.int32)

    def forward(self, x: Tensor) -> Tensor:
        """``s * codes`` with a straight-through gradient to ``x``."""
        return x + (self.codes(x) * self.expanded_scale(x) - x).detach()


def write_image_folder(root, counts: dict[str, int], px: int, classes: int = 3, seed: int = 0) -> None:
    """``root/<split>/class<c>/<i>.png``: ``counts[split]`` random RGB images a split, spread over ``classes``
    classes, each class a different brightness band (learnable in a few steps)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n // classes):
                img = (rng.random((px, px, 3)) * 80 + 60 * c).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
