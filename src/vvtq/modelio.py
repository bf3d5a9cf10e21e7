"""Building and loading models: a timm architecture, a Hugging Face model (``vvtq.hf``), a vvtq checkpoint, a
frozen teacher.

Every model built here carries its ``ModelSpec`` (``model.vvtq_spec``), so that it can be saved, exported or
rebuilt without a hand-written metadata dict. Training, evaluation, analysis, export and the demo all load
models through this module; none of them needs the training loop for it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from .device import unwrap
from .errors import ConfigError
from .hf import build_hf, input_fields, is_hf_source
from .spec import ModelSpec, timm_input


def build_model(name: str | ModelSpec, model_kwargs: dict[str, Any] | None = None, pretrained: bool = False,
                drop_path: float = 0.0) -> nn.Module:
    """A timm model by name (the vvtq minis are registered on import), a Hugging Face model (a ``save_pretrained``
    folder or ``hf:ID``, with its weights; ``vvtq.hf``), or the model a ``ModelSpec`` describes: quantized
    (uncalibrated) when the spec has a quantization config. The spec is recorded as ``vvtq_spec``."""
    from . import models  # noqa: F401

    if isinstance(name, ModelSpec):
        spec = name
    else:
        spec = ModelSpec(name, dict(model_kwargs or {}))
    if is_hf_source(spec.name, spec.model_kwargs):
        # a name builds from its source (weights included); a spec from the architecture it records
        model = build_hf(spec.name, spec.model_kwargs if isinstance(name, ModelSpec) else dict(model_kwargs or {}),
                         drop_path)
        if not isinstance(name, ModelSpec):
            spec = replace(spec, **input_fields(model, spec.name))
    else:
        model = _create_timm(spec, pretrained, drop_path)
        if not isinstance(name, ModelSpec):
            spec = replace(spec, **timm_input(model))
    model.vvtq_spec = spec
    if spec.quant is not None:
        from .quant import quantize_model

        quantize_model(model, spec.quant_config())
    return model


def _create_timm(spec: ModelSpec, pretrained: bool, drop_path: float) -> nn.Module:
    kwargs = dict(spec.model_kwargs)
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    try:
        return timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise CheckpointError(f"unknown model {spec.name!r}") from None
        raise
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):  # a mistyped model_kwargs key
            raise ConfigError(f"model {spec.name!r}: {exc}") from None
        raise


def load_model(source: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A model in eval mode and its metadata, from a vvtq checkpoint (the model it was saved from, quantized if it
    was), ``timm:NAME`` (timm's pretrained weights) or a Hugging Face model (a ``save_pretrained`` folder, or
    ``hf:ID``: transformers' ``from_pretrained``); for the last two the metadata is the model's ``ModelSpec`` dict.

    A checkpoint that does not fit its own recorded architecture or quantization config raises
    ``CheckpointError``.
    """
    if isinstance(source, str) and source.startswith("timm:"):
        model = build_model(source[5:], pretrained=True)
        return model.to(device).eval(), model.vvtq_spec.to_dict()
    if is_hf_source(str(source)):
        model = build_model(str(source))
        return model.to(device).eval(), model.vvtq_spec.to_dict()
    meta = read_meta(source)
    ckpt = load_checkpoint(source, map_location="cpu")
    model = build_model(ModelSpec.from_dict(meta))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not fit the model it records: {exc}") from None
    return model.to(device).eval(), meta


def check_spec(model: nn.Module, spec: ModelSpec) -> None:
    """Raise ``ConfigError`` unless ``spec`` builds a model with exactly ``model``'s tensors (names and shapes).
    The probe is built on the meta device: it costs no memory."""
    with torch.device("meta"):
        probe = build_model(spec)
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise ConfigError(f"the model does not match its spec {spec.name!r} {spec.model_kwargs} (differs at "
                          f"{', '.join(diff[:3])}); pass the spec it was built from (vvtq.ModelSpec)")


class EnsembleTeacher(nn.Module):
    """The mean of several frozen teachers' class probabilities. Each teacher sees the crops resized to its own
    input size (bilinear), so a 28 px DeiT teacher can label 32 px Swin crops. With ``flip``, each also sees the
    mirrored crop and the mean runs over both views (flip test-time augmentation). Returns *probabilities*."""

    def __init__(self, teachers: list[nn.Module], img_sizes: list[int | None], flip: bool = False):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.img_sizes = img_sizes
        self.flip = bool(flip)

    def forward(self, x: Tensor) -> Tensor:
        probs = None
        for teacher, size in zip(self.teachers, self.img_sizes, strict=True):
            xi = x if size is None or x.shape[-1] == size else F.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            for view in ((xi, xi.flip(-1)) if self.flip else (xi,)):
                p = teacher(view).float().softmax(-1)
                probs = p if probs is None else probs + p
        return probs / (len(self.teachers) * (2 if self.flip else 1))


def load_teacher(spec: str | list[str], model_kwargs: dict[str, Any], device: torch.device,
                 flip: bool = False) -> nn.Module:
    """A frozen FP teacher that returns class probabilities: a vvtq checkpoint path, ``timm:NAME`` for timm's
    pretrained weights (built with ``model_kwargs``; an HF student's recorded architecture left out), a Hugging
    Face model (folder or ``hf:ID``), or a list of them (their probabilities averaged); with ``flip``, averaged
    over each input and its mirror too."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise CheckpointError("teacher.checkpoint is an empty list")
    teachers, sizes = [], []
    for one in specs:
        if one.startswith("timm:"):
            kwargs = {k: v for k, v in model_kwargs.items() if k != "hf"}
            teachers.append(build_model(one[5:], kwargs, pretrained=True))
            sizes.append(None)
            continue
        teacher, meta = load_model(one, "cpu")
        if meta.get("quant") is not None:
            raise CheckpointError(f"teacher {one} is quantized; distillation needs a full-precision teacher")
        teachers.append(teacher)
        sizes.append(int(meta["img_size"]))
    return EnsembleTeacher(teachers, sizes, flip).to(device).eval().requires_grad_(False)


def load_models(paths: list[str], device: str | torch.device = "cpu",
                flip: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """One checkpoint as ``load_model`` loads it; several FP checkpoints (or one, with ``flip``: each image and its
    mirror) as one model whose logits are the log of their mean probabilities (an ensemble: what
    ``teacher.checkpoint: [A, B]`` distils from). The metadata (dataset, input size, normalisation) is the first
    checkpoint's."""
    if len(paths) == 1 and not flip:
        return load_model(paths[0], device)
    for path in paths:
        if read_meta(path).get("quant") is not None:
            raise CheckpointError(f"{path} is quantized; ensembles and flip averaging take full-precision checkpoints")
    ensemble = load_teacher(list(paths), {}, torch.device(device), flip)
    return _LogOf(ensemble).eval(), load_model(paths[0], "cpu")[1]


class _LogOf(nn.Module):
    """``log(f(x))`` of a module that returns probabilities: logits whose softmax is those probabilities."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).clamp_min(1e-12).log()


def checkpoint_kwargs(path: str | Path, model: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` on top of the model options recorded in checkpoint ``path``, which must hold ``model``."""
    meta = read_meta(path)
    if meta.get("model") != model:
        raise CheckpointError(f"{path} holds model {meta.get('model')!r}, the recipe asks for {model!r}")
    return {**meta.get("model_kwargs", {}), **kwargs}


def load_fp_weights(model: nn.Module, path: str | Path) -> None:
    """Load an FP checkpoint's weights into ``model`` (the start of a QAT run)."""
    meta = read_meta(path)
    if meta.get("quant") is not None:
        raise CheckpointError(f"init_from {path} is a quantized checkpoint; QAT starts from an FP checkpoint")
    state = load_checkpoint(path)["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"init_from {path} does not fit model {meta.get('model')!r}: {exc}") from None


def save_model(model: nn.Module, path: str | Path, spec: ModelSpec | None = None, **meta: Any) -> None:
    """Write ``model`` as a vvtq checkpoint that ``load_model`` (and ``vvtq eval``, ``analyze``, ``export``)
    reads: its weights and its ``ModelSpec`` (recorded on the model unless ``spec`` is given; the quantization
    config is the model's), plus ``meta`` (JSON-serialisable: e.g. ``step``, ``train_config``)."""
    model = unwrap(model)  # a DistributedDataParallel wrapper
    spec = spec or ModelSpec.of(model)
    config = getattr(model, "vvtq_config", None)
    spec = spec.with_quant(config) if config is not None else spec
    save_checkpoint(path, model.state_dict(), {**meta, **spec.to_dict()})
