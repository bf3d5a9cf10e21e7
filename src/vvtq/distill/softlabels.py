"""Precomputed soft labels (FKD-style): per image, M crop boxes with the teacher's top-k classes and
probabilities.

File format: a safetensors file (never pickle) with tensors ``boxes`` float32 ``[N, M, 5]``
(``y0, x0, h, w, flip``, relative coordinates), ``topk_idx`` int16/int32 ``[N, M, k]`` and ``topk_prob``
float16/float32 ``[N, M, k]``; the safetensors metadata holds ``format``, ``format_version`` and a JSON
document under ``vvtq_softlabels`` (dataset identity, num_classes, M, k, out_size, mean, std, seed, ...).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vvtq.data.base import ImageDataset
from vvtq.data.multicrop import STREAM_SOFTLABEL_CROPS
from vvtq.data.transforms import apply_crop, boxes_to_tensor, item_generator, normalize, sample_crop
from vvtq.errors import VVTQError
from vvtq.fileio import atomic_write, safetensors_header
from vvtq.progress import progress

FORMAT_NAME = "vvtq-softlabels"
FORMAT_VERSION = 1
META_KEY = "vvtq_softlabels"
INTERPOLATION = "bilinear-antialias-down"

class SoftLabelError(VVTQError, ValueError):
    """A soft-label file is missing, corrupt, or was made for another dataset/split/class count."""


def expand_probs(topk_idx: torch.Tensor, topk_prob: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full probabilities ``[..., num_classes]`` from top-k: ``1 - sum(top-k)`` is spread uniformly over the
    other ``num_classes - k`` classes (marginal smoothing)."""
    if topk_idx.shape != topk_prob.shape:
        raise ValueError(f"topk_idx {tuple(topk_idx.shape)} and topk_prob {tuple(topk_prob.shape)} differ")
    k = topk_idx.shape[-1]
    if k > num_classes:
        raise ValueError(f"top-k ({k}) exceeds num_classes ({num_classes})")
    p = topk_prob.float().clamp(min=0.0)
    rest = (1.0 - p.sum(-1, keepdim=True)).clamp(min=0.0)
    fill = rest / (num_classes - k) if num_classes > k else torch.zeros_like(rest)
    out = fill.expand(*p.shape[:-1], num_classes).clone()
    out.scatter_(-1, topk_idx.long(), p)
    return out / out.sum(-1, keepdim=True).clamp(min=1e-12)


class _TeacherCrops(Dataset):
    """Unit ``u`` = image ``u // chunks``, crops ``[j*c, (j+1)*c)`` of its M boxes (j = ``u % chunks``)."""

    def __init__(
        self, dataset: ImageDataset, m: int, chunk: int, out_size: int, mean, std, seed, scale, ratio, translate
    ):
        self.dataset, self.m, self.chunk, self.out_size = dataset, m, chunk, out_size
        self.mean, self.std, self.seed, self.scale, self.ratio = mean, std, seed, scale, ratio
        self.translate = translate
        self.chunks = math.ceil(m / chunk)

    def __len__(self) -> int:
        return len(self.dataset) * self.chunks

    def __getitem__(self, u: int):
        i, j = divmod(int(u), self.chunks)
        img = self.dataset.get_image(i)
        g = item_generator(self.seed, 0, i, STREAM_SOFTLABEL_CROPS)
        aspect = img.shape[-1] / img.shape[-2]
        boxes = [sample_crop(g, self.scale, self.ratio, image_aspect=aspect, translate=self.translate)
                 for _ in range(self.m)]
        lo, hi = j * self.chunk, min(self.m, (j + 1) * self.chunk)
        crops = torch.stack([apply_crop(img, b, self.out_size) for b in boxes[lo:hi]])
        return normalize(crops, self.mean, self.std), boxes_to_tensor(boxes[lo:hi]), i, lo


def _collate_units(batch):
    return (
        torch.cat([b[0] for b in batch]),
        torch.cat([b[1] for b in batch]),
        [(b[2], b[3], b[1].shape[0]) for b in batch],
    )


@dataclass
class SoftLabelOptions:
    """How ``generate_softlabels`` labels a dataset: M crops an image (``num_crops_per_image``) of random area in
    ``scale`` and aspect in ``ratio``, resized to ``out_size`` and normalised by ``mean`` / ``std`` (default: the
    dataset's); the teacher's ``top_k`` classes kept, probabilities as ``prob_dtype``; boxes drawn from ``seed``;
    ``batch_size`` crops a teacher call (on ``device`` when given), read by ``num_workers`` loader processes. With
    ``flip``, a crop's label is the mean of the teacher's probabilities for it and its mirror (test-time
    augmentation); ``amp="bf16"`` runs the teacher under bf16 autocast on channels-last batches (a convolutional
    teacher runs ~2x faster on a CPU), autocast for the batch's device: pass ``device`` rather than moving batches
    inside the teacher."""

    num_crops_per_image: int = 500
    top_k: int = 5
    out_size: int = 224
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    seed: int = 0
    batch_size: int = 256
    progress: bool = False
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    translate: float = 0.0
    device: str | torch.device | None = None
    num_workers: int = 0
    prob_dtype: torch.dtype = torch.float16
    flip: bool = False
    amp: str = "fp32"

    def check(self, dataset: ImageDataset) -> None:
        """Raise unless these options can label ``dataset``."""
        m, k, c = int(self.num_crops_per_image), int(self.top_k), dataset.num_classes
        if m < 1 or not 1 <= k <= c:
            raise SoftLabelError(f"need num_crops_per_image >= 1 and 1 <= top_k <= num_classes ({c}); got {m}, {k}")
        if len(dataset) == 0:
            raise SoftLabelError("cannot generate soft labels for an empty dataset")
        if self.prob_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"prob_dtype must be float16 or float32, got {self.prob_dtype}")
        if self.amp not in ("fp32", "bf16"):
            raise SoftLabelError(f"amp must be fp32 or bf16, got {self.amp!r}")


@torch.no_grad()
def generate_softlabels(teacher: Callable[[torch.Tensor], torch.Tensor], dataset: ImageDataset,
                        out_path: str | os.PathLike, *, options: SoftLabelOptions | None = None,
                        **settings: Any) -> Path:
    """Run ``teacher`` on M random crops of every image and store boxes + top-k probabilities (atomically).

    ``teacher`` maps a normalised batch ``[B, C, S, S]`` (moved to ``device`` if given) to logits
    ``[B, num_classes]``. Boxes are deterministic from ``seed``; crops are batched across images. ``options`` (or
    its fields as keywords: ``num_crops_per_image=50``, ``top_k=5``, ...) say how; with ``amp="bf16"`` a module
    teacher is converted to channels-last in place.
    """
    if options is not None and settings:
        raise TypeError("generate_softlabels: pass options or keyword settings, not both")
    opts = options or SoftLabelOptions(**settings)
    opts.check(dataset)
    mean = tuple(float(v) for v in (dataset.mean if opts.mean is None else opts.mean))
    std = tuple(float(v) for v in (dataset.std if opts.std is None else opts.std))
    out_path = Path(out_path)
    if opts.amp == "bf16" and isinstance(teacher, torch.nn.Module):
        teacher.to(memory_format=torch.channels_last)
    with _eval_mode(teacher), atomic_write(out_path) as tmp:
        _write_labels(tmp, teacher, dataset, opts, mean, std)
    return out_path


@contextlib.contextmanager
def _eval_mode(teacher: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """The teacher in eval mode (a module), back in training mode afterwards if it was."""
    was_training = isinstance(teacher, torch.nn.Module) and teacher.training
    if isinstance(teacher, torch.nn.Module):
        teacher.eval()
    try:
        yield
    finally:
        if was_training:
            teacher.train()


def _file_metadata(dataset: ImageDataset, opts: SoftLabelOptions, mean: tuple[float, ...],
                   std: tuple[float, ...]) -> dict[str, str]:
    """The safetensors metadata of a soft-label file: format, version and the JSON document."""
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "dataset": dataset.identity(),
        "num_classes": dataset.num_classes, "num_images": len(dataset), "num_crops": int(opts.num_crops_per_image),
        "top_k": int(opts.top_k), "out_size": int(opts.out_size), "mean": list(mean), "std": list(std),
        "seed": int(opts.seed), "scale": list(opts.scale), "ratio": list(opts.ratio), "interpolation": INTERPOLATION,
        "translate": float(opts.translate), "flip_average": bool(opts.flip), "amp": opts.amp,
    }
    return {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), META_KEY: json.dumps(meta)}


def _write_labels(path: Path, teacher: Callable[[torch.Tensor], torch.Tensor], dataset: ImageDataset,
                  opts: SoftLabelOptions, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Lay the file out at ``path`` (header, then the tensors' space), then fill it batch by batch."""
    n, m, k, c = len(dataset), int(opts.num_crops_per_image), int(opts.top_k), dataset.num_classes
    idx_dtype = torch.int16 if c <= 32767 else torch.int32
    arrays = _allocate(path, [("boxes", torch.float32, (n, m, 5)), ("topk_idx", idx_dtype, (n, m, k)),
                              ("topk_prob", opts.prob_dtype, (n, m, k))], _file_metadata(dataset, opts, mean, std))
    done = np.zeros((n, m), dtype=bool)
    for x, boxes, units in _crop_loader(dataset, opts, mean, std):
        top_p, top_i = _teacher_topk(teacher, x, opts, c, idx_dtype)
        rows = {"boxes": boxes.numpy(), "topk_idx": top_i, "topk_prob": top_p}
        pos = 0
        for i, lo, cnt in units:
            for name, values in rows.items():
                arrays[name][i, lo:lo + cnt] = values[pos:pos + cnt]
            done[i, lo:lo + cnt] = True
            pos += cnt
    if not done.all():
        raise RuntimeError("soft-label generation did not cover every crop")
    for a in arrays.values():
        a.flush()


def _allocate(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
              metadata: dict[str, str]) -> dict[str, np.memmap]:
    """Write the safetensors header and size the file; each tensor's bytes as a writable memory map."""
    header, spans = safetensors_header(entries, metadata)
    with open(path, "r+b") as f:
        f.write(header)
        f.truncate(max([len(header), *(end for _, end in spans.values())]))
    return {name: np.memmap(path, dtype=torch.empty(0, dtype=dt).numpy().dtype, mode="r+", offset=spans[name][0],
                            shape=shape) for name, dt, shape in entries}


def _crop_loader(dataset: ImageDataset, opts: SoftLabelOptions, mean: tuple[float, ...], std: tuple[float, ...]):
    """Batches of ``(crops, boxes, [(image, first crop, count)])``, about ``batch_size`` crops each."""
    m = int(opts.num_crops_per_image)
    chunk = max(1, min(m, int(opts.batch_size)))
    units = _TeacherCrops(dataset, m, chunk, int(opts.out_size), mean, std, int(opts.seed), tuple(opts.scale),
                          tuple(opts.ratio), float(opts.translate))
    loader = DataLoader(units, batch_size=max(1, int(opts.batch_size) // chunk), shuffle=False,
                        num_workers=opts.num_workers, collate_fn=_collate_units)
    return progress(loader, opts.progress, len(loader), "soft labels", every=max(1, len(loader) // 20))


def _teacher_topk(teacher: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, opts: SoftLabelOptions,
                  num_classes: int, idx_dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k probabilities and classes for a batch of crops, as the file stores them."""
    if opts.device is not None:
        x = x.to(opts.device, non_blocking=True)
    if opts.amp == "bf16":
        x = x.contiguous(memory_format=torch.channels_last)
    views = (x, x.flip(-1)) if opts.flip else (x,)
    probs = torch.zeros(x.shape[0], num_classes)
    for view in views:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=opts.amp == "bf16"):
            logits = teacher(view)
        if logits.dim() != 2 or logits.shape != (x.shape[0], num_classes):
            raise ValueError(f"teacher returned shape {tuple(logits.shape)}, expected ({x.shape[0]}, {num_classes})")
        probs = probs.to(logits.device) + torch.softmax(logits.float(), dim=-1)
    top_p, top_i = (probs / len(views)).topk(int(opts.top_k), dim=-1)
    return top_p.to(opts.prob_dtype).cpu().numpy(), top_i.to(idx_dtype).cpu().numpy()


class SoftLabelFile:
    """A soft-label file opened memory-mapped; rows are read lazily per image with :meth:`get`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SoftLabelError(f"soft-label file {self.path} not found")
        self._handle = None
        handle = self._open()
        md = handle.metadata() or {}
        if md.get("format") != FORMAT_NAME or META_KEY not in md:
            raise SoftLabelError(f"{self.path} is a safetensors file but not a vvtq soft-label file")
        try:
            self.meta: dict[str, Any] = json.loads(md[META_KEY])
        except json.JSONDecodeError as e:
            raise SoftLabelError(f"corrupt soft-label metadata in {self.path}: {e}") from e
        if int(self.meta.get("version", -1)) != FORMAT_VERSION:
            raise SoftLabelError(
                f"{self.path}: unsupported soft-label format version {self.meta.get('version')}"
            )
        keys = set(handle.keys())
        missing = {"boxes", "topk_idx", "topk_prob"} - keys
        if missing:
            raise SoftLabelError(f"corrupt soft-label file {self.path}: missing tensors {sorted(missing)}")
        n, m, k = self.num_images, self.num_crops, self.top_k
        want = {"boxes": [n, m, 5], "topk_idx": [n, m, k], "topk_prob": [n, m, k]}
        for name, shape in want.items():
            got = list(handle.get_slice(name).get_shape())
            if got != shape:
                raise SoftLabelError(
                    f"corrupt soft-label file {self.path}: {name} has shape {got}, expected {shape}"
                )

    def _open(self):
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise SoftLabelError(f"cannot open soft-label file {self.path}: {e}") from e
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None  # re-opened lazily in each worker
        return state

    @property
    def num_images(self) -> int:
        return int(self.meta["num_images"])

    @property
    def num_crops(self) -> int:
        return int(self.meta["num_crops"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def out_size(self) -> int:
        return int(self.meta["out_size"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.meta["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.meta["std"])

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def dataset_identity(self) -> dict[str, Any]:
        return dict(self.meta.get("dataset", {}))

    def validate(self, dataset: ImageDataset, num_classes: int | None = None) -> None:
        """Raise :class:`SoftLabelError` unless this file was made for ``dataset`` (and ``num_classes``)."""
        ident, mine = dataset.identity(), self.dataset_identity
        problems = []
        for key in ("name", "split", "num_images"):
            if mine.get(key) != ident[key]:
                problems.append(f"{key}: file has {mine.get(key)!r}, dataset has {ident[key]!r}")
        want_c = dataset.num_classes if num_classes is None else int(num_classes)
        if self.num_classes != want_c:
            problems.append(f"num_classes: file has {self.num_classes}, expected {want_c}")
        if not problems and mine.get("fingerprint") != ident["fingerprint"]:
            problems.append(
                f"fingerprint: file has {mine.get('fingerprint')!r}, dataset has {ident['fingerprint']!r} "
                "(same size but different images/labels)"
            )
        if problems:
            raise SoftLabelError(
                f"soft-label file {self.path} was made for another dataset: " + "; ".join(problems)
            )

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image ``i``: ``(boxes [M,5] float32, topk_idx [M,k] long, topk_prob [M,k] float32)``."""
        n = self.num_images
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images in {self.path}")
        i %= n
        h = self._open()
        return (
            h.get_slice("boxes")[i].float(),
            h.get_slice("topk_idx")[i].long(),
            h.get_slice("topk_prob")[i].float(),
        )

    def probs(self, i: int) -> torch.Tensor:
        """Image ``i``'s smoothed target probabilities ``[M, num_classes]``."""
        _, idx, p = self.get(i)
        return expand_probs(idx, p, self.num_classes)

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (
            f"SoftLabelFile({str(self.path)!r}, images={self.num_images}, crops={self.num_crops}, "
            f"top_k={self.top_k}, classes={self.num_classes}, out_size={self.out_size})"
        )
