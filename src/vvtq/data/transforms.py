"""Replayable crops: boxes in relative coordinates, deterministic pixel crops, normalisation, seeding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_MASK64 = (1 << 64) - 1


def _f32(v: float) -> float:
    """Round to the nearest float32, so a box survives storage as float32 unchanged."""
    return float(np.float32(v))


@dataclass(frozen=True)
class CropBox:
    """A crop: top-left ``(y0, x0)`` and size ``(h, w)`` as fractions of the image, then an optional h-flip.

    Coordinates are rounded to float32 on construction, so storing a box as float32 and reading it back
    reproduces exactly the same pixel crop.
    """

    y0: float
    x0: float
    h: float
    w: float
    flip: bool = False

    def __post_init__(self) -> None:
        for k in ("y0", "x0", "h", "w"):
            object.__setattr__(self, k, _f32(getattr(self, k)))
        object.__setattr__(self, "flip", bool(self.flip))
        if not (self.h > 0 and self.w > 0):
            raise ValueError(f"crop box needs positive size, got h={self.h}, w={self.w}")

    def to_tensor(self) -> torch.Tensor:
        """``[5]`` float32 ``(y0, x0, h, w, flip)``."""
        return torch.tensor([self.y0, self.x0, self.h, self.w, float(self.flip)], dtype=torch.float32)

    @classmethod
    def from_tensor(cls, row: torch.Tensor | Sequence[float]) -> CropBox:
        """Inverse of :meth:`to_tensor`."""
        v = [float(t) for t in (row.tolist() if isinstance(row, torch.Tensor) else row)]
        if len(v) != 5:
            raise ValueError(f"a crop box row has 5 values, got {len(v)}")
        return cls(v[0], v[1], v[2], v[3], v[4] >= 0.5)

    @classmethod
    def full(cls) -> CropBox:
        """The whole image, unflipped."""
        return cls(0.0, 0.0, 1.0, 1.0, False)


def boxes_to_tensor(boxes: Sequence[CropBox]) -> torch.Tensor:
    """Stack boxes into ``[K, 5]`` float32."""
    if not boxes:
        return torch.zeros(0, 5, dtype=torch.float32)
    return torch.stack([b.to_tensor() for b in boxes])


def item_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for one (seed, epoch, index, stream), independent of loader order/workers."""
    x = 0
    for v in (seed, epoch, index, stream):
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        # splitmix64 finaliser
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def item_generator(seed: int, epoch: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`item_seed`."""
    g = torch.Generator()
    g.manual_seed(item_seed(seed, epoch, index, stream))
    return g


def _uniform(rng: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=rng, dtype=torch.float64))


def sample_crop(
    rng: torch.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    image_aspect: float = 1.0,
    flip_prob: float = 0.5,
    attempts: int = 10,
    translate: float = 0.0,
) -> CropBox:
    """Sample a random-resized-crop box in relative coordinates.

    ``scale`` bounds the crop's area fraction, ``ratio`` its pixel aspect ratio (w/h) drawn log-uniformly;
    ``image_aspect`` is the image's W/H so that pixel aspect ratios come out right on non-square images.
    After ``attempts`` failures the centre crop (clamped to ``ratio``) is returned, as torchvision does.
    ``translate`` then shifts the box by up to that fraction of the image side in each direction (the part outside
    the image is filled by reflection in ``apply_crop``): with ``scale`` (1, 1) this is the pad-and-crop
    augmentation of the CIFAR-10 ResNets (He et al. 2016, Sec. 4.2), which keeps pixels unresized.
    """
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
    if not 0.0 <= translate < 1.0:
        raise ValueError(f"translate must be in [0, 1), got {translate}")
    a = float(image_aspect)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(attempts if scale[0] < 1.0 else 0):  # area 1: the whole image
        area = _uniform(rng, scale[0], scale[1])
        r = math.exp(_uniform(rng, log_r[0], log_r[1]))
        w = math.sqrt(area * r / a)
        h = math.sqrt(area * a / r)
        if 0 < w <= 1 and 0 < h <= 1:
            y0 = _uniform(rng, 0.0, 1.0 - h)
            x0 = _uniform(rng, 0.0, 1.0 - w)
            box = (y0, x0, h, w)
            break
    if box is None:
        if a < ratio[0]:
            w, h = 1.0, a / ratio[0]
        elif a > ratio[1]:
            w, h = ratio[1] / a, 1.0
        else:
            w, h = 1.0, 1.0
        box = ((1.0 - h) / 2, (1.0 - w) / 2, h, w)
    flip = bool(float(torch.rand((), generator=rng, dtype=torch.float64)) < flip_prob)
    y0, x0, h, w = box
    # keep the float32-rounded box inside the image
    h, w = _f32(h), _f32(w)
    y0 = min(max(_f32(y0), 0.0), max(0.0, 1.0 - h))
    x0 = min(max(_f32(x0), 0.0), max(0.0, 1.0 - w))
    if translate > 0.0:  # drawn last: without it the boxes are those of earlier versions, draw for draw
        y0 += _uniform(rng, -translate, translate)
        x0 += _uniform(rng, -translate, translate)
    return CropBox(y0, x0, h, w, flip)


def box_to_pixels(box: CropBox, height: int, width: int) -> tuple[int, int, int, int]:
    """The integer pixel region ``(top, left, h, w)`` a relative box covers on an ``height x width`` image."""
    top = int(round(box.y0 * height))
    left = int(round(box.x0 * width))
    h = max(1, int(round(box.h * height)))
    w = max(1, int(round(box.w * width)))
    h, w = min(h, height), min(w, width)
    top = min(max(top, 0), height - h)
    left = min(max(left, 0), width - w)
    return top, left, h, w


def apply_crop(img: torch.Tensor, box: CropBox, out_size: int, antialias: bool = True) -> torch.Tensor:
    """Crop ``img`` ``[C, H, W]`` (float) to ``box`` and resize to ``[C, out_size, out_size]`` (bilinear).

    Deterministic: the same image and box always give the same pixels.
    """
    if img.dim() != 3:
        raise ValueError(f"apply_crop expects [C,H,W], got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        img = img.to(torch.float32)
    _, H, W = img.shape
    if box.y0 >= 0 and box.x0 >= 0 and box.y0 + box.h <= 1 and box.x0 + box.w <= 1:
        top, left, h, w = box_to_pixels(box, H, W)
        region = img[:, top : top + h, left : left + w]
    else:
        region = _region_outside(img, box)
        h, w = region.shape[-2:]
    if (h, w) == (out_size, out_size):
        out = region.clone()
    else:
        out = F.interpolate(
            region.unsqueeze(0),
            size=(out_size, out_size),
            mode="bilinear",
            align_corners=False,
            antialias=antialias and (h > out_size or w > out_size),
        ).squeeze(0)
    if box.flip:
        out = out.flip(-1)
    return out.contiguous()


def _region_outside(img: torch.Tensor, box: CropBox) -> torch.Tensor:
    """The pixels of a box that reaches outside the image, the outside filled by reflection (by repetition of the
    edge where the box reaches further than the image is wide)."""
    _, H, W = img.shape
    top, left = int(round(box.y0 * H)), int(round(box.x0 * W))
    h, w = max(1, int(round(box.h * H))), max(1, int(round(box.w * W)))
    pads = (max(0, -left), max(0, left + w - W), max(0, -top), max(0, top + h - H))  # left, right, top, bottom
    mode = "reflect" if max(pads[:2]) < W and max(pads[2:]) < H else "replicate"
    padded = F.pad(img.unsqueeze(0), pads, mode=mode).squeeze(0)
    top, left = top + pads[2], left + pads[0]
    return padded[:, top : top + h, left : left + w]


def resize_full(img: torch.Tensor, out_size: int, antialias: bool = True) -> torch.Tensor:
    """Resize the whole image to ``[C, out_size, out_size]`` (no crop, no flip)."""
    return apply_crop(img, CropBox.full(), out_size, antialias=antialias)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, for ``[C,H,W]`` or ``[B,C,H,W]``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    if m.shape[0] != x.shape[-3] or s.shape[0] != x.shape[-3]:
        raise ValueError(f"mean/std have {m.shape[0]}/{s.shape[0]} channels, image has {x.shape[-3]}")
    return (x - m) / s
