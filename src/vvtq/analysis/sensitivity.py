"""Module sensitivity: quantize one group of sites at a time, the rest in FP (docs/METHOD.md §1; VVTQ §3.1).

A *group* is a set of quantizer sites: one module kind across all blocks (``q``, ``fc1``, ``attn_prob``, ...),
one transformer block, or one layer's weight. For each group, on a fixed evaluation subset,

    drop = top1(FP) - top1(group quantized)
    KL   = mean over images of  sum_c p_FP(c) * (log p_FP(c) - log p_group(c))

Two modes:
- ``"ptq"`` (FP checkpoints, and the mixed-precision search): the model is rebuilt at ``bits`` for the sites
  of the groups (edge sites at 8 bits), with no training. Activation scales are fitted on calibration batches
  with every quantizer off (each site sees FP inputs), weight scales by MSE on the (latent) weights.
- ``"learned"`` (quantized checkpoints): the model's own trained scales and bit-widths; the reference is the
  same model with every quantizer switched off (its latent weights in FP).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant import Quantizer, calibrate
from ..quant.config import EDGE_KINDS
from .stats import as_analysis_model, layer_of, site_module

__all__ = ["DEFAULT_ACT_KINDS", "DEFAULT_WEIGHT_KINDS", "SensitivityResult", "block_groups", "kind_groups",
           "module_groups", "requantize", "run_sensitivity"]

DEFAULT_WEIGHT_KINDS = ("q", "k", "v", "qkv", "proj", "fc1", "fc2")
DEFAULT_ACT_KINDS = ("attn_in", "q_act", "k_act", "v_act", "attn_prob", "attn_out", "mlp_in", "mlp_hidden")


@dataclass
class SensitivityResult:
    """One group's result: accuracy (%) on the subset, its drop from FP (points) and KL to the FP output."""

    label: str
    sites: list[str]
    bits: int
    acc: float
    drop: float
    kl: float
    params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]


# ------------------------------------------------------------------------------------------------ groups
def kind_groups(model: nn.Module, kinds: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``{kind: [site, ...]}``: every site of one module kind, in every block (edges excluded by default)."""
    kinds = tuple(kinds) if kinds is not None else DEFAULT_WEIGHT_KINDS + DEFAULT_ACT_KINDS
    out: dict[str, list[str]] = {}
    for name, q in _quantizers(as_analysis_model(model)):
        if q.kind in kinds:
            out.setdefault(q.kind, []).append(name)
    return {k: out[k] for k in kinds if k in out}


def block_groups(model: nn.Module) -> dict[str, list[str]]:
    """``{"blocks.i": [site, ...]}``: all weight and activation sites of one transformer block."""
    out: dict[str, list[str]] = {}
    for name, _q in _quantizers(as_analysis_model(model)):
        if layer_of(name):
            out.setdefault(layer_of(name), []).append(name)
    return out


def module_groups(model: nn.Module, include_edges: bool = False) -> dict[str, list[str]]:
    """``{"blocks.i.attn.q": ["blocks.i.attn.q.weight_quant"], ...}``: one group per weight (per layer)."""
    return {site_module(name): [name] for name, q in _quantizers(as_analysis_model(model))
            if q.is_weight and (include_edges or q.kind not in EDGE_KINDS)}


# ------------------------------------------------------------------------------------------------ rebuilding
def requantize(model: nn.Module, bits_for: Callable[[str, Quantizer], int]) -> nn.Module:
    """A deep copy of a converted model (an FP model is first converted at 32 bits) whose quantizers are
    rebuilt, uninitialised, at ``bits_for(site_name, old_quantizer)`` bits with the same sign, granularity,
    grouping, offset and names. Weights are shared by value (copied), not by reference."""
    model = copy.deepcopy(as_analysis_model(model))
    for name, q in _quantizers(model):
        size = None if q.granularity == "tensor" else q.num_groups
        new = Quantizer(bits_for(name, q), signed=q.signed, granularity=q.granularity, axis=q.axis, size=size,
                        num_groups=q.num_groups if q.granularity == "head" else None,
                        learn_offset=q.offset is not None, is_weight=q.is_weight,
                        grad_scale_mode=q.grad_scale_mode, init_method=q.init_method, name=q.name,
                        kind=q.kind)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new.to(q.scale.device))
    return model


@torch.no_grad()
def calibrate_on_fp(model: nn.Module, batches: Iterable | None, num_batches: int | None = None) -> nn.Module:
    """PTQ calibration where every activation scale is fitted on FP inputs (all weights off meanwhile), and
    every weight scale by MSE on its weight. Leaves all quantizers switched on."""
    quants = [q for _n, q in _quantizers(model) if q.bits < 32]
    if any(not q.is_weight for q in quants):
        for q in quants:
            q.set_enabled(not q.is_weight)
        calibrate(model, batches, num_batches=num_batches)
    for q in quants:
        q.set_enabled(q.is_weight)
    if any(q.is_weight for q in quants):
        calibrate(model)
    for q in quants:
        q.set_enabled(True)
    return model


def _enable_only(model: nn.Module, sites: set[str] | None) -> None:
    for name, q in _quantizers(model):
        q.set_enabled(sites is None or name in sites)


@torch.no_grad()
def _logits(model: nn.Module, batches: Sequence, device: torch.device) -> Tensor:
    model.eval()
    return torch.cat([model(b[0].to(device)).float().cpu() for b in batches])


def _kl(ref: Tensor, logits: Tensor) -> float:
    kl = float(F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean"))
    return max(kl, 0.0)  # rounding can make a KL of (almost) identical outputs slightly negative


def _acc(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * float((logits.argmax(-1) == labels).float().mean()) if labels.numel() else math.nan


def run_sensitivity(model: nn.Module, eval_batches: Sequence, groups: dict[str, list[str]], *, bits: int = 2,
                    mode: str = "ptq", calib_batches: Iterable | None = None,
                    device: torch.device | str = "cpu", include_all: bool = False,
                    ) -> tuple[dict[str, float], list[SensitivityResult]]:
    """Quantize each group of ``groups`` alone and compare with FP on ``eval_batches`` (a list of ``(x, y)``).

    Returns ``(reference, results)``: ``reference`` holds the FP top-1 (``acc``) and, with ``include_all``,
    the all-quantized row is appended to ``results`` under the label ``"all"``.
    """
    if mode not in ("ptq", "learned"):
        raise ValueError(f"mode must be 'ptq' or 'learned', got {mode!r}")
    device = torch.device(device)
    union = {s for sites in groups.values() for s in sites}
    if mode == "ptq":
        def bits_for(name: str, q: Quantizer) -> int:
            if name not in union and not include_all:
                return 32
            return 8 if q.kind in EDGE_KINDS and bits < 32 else bits

        qm = requantize(model, bits_for).to(device)
        calibrate_on_fp(qm, calib_batches)
    else:
        if getattr(model, "vvtq_config", None) is None:
            raise ValueError("mode 'learned' needs a quantized model")
        qm = copy.deepcopy(model).to(device)
    labels = torch.cat([b[1].reshape(-1).cpu() for b in eval_batches])
    _enable_only(qm, set())
    ref = _logits(qm, eval_batches, device)
    ref_acc = _acc(ref, labels)
    sizes = {name: q.scale.numel() for name, q in _quantizers(qm)}
    params = {name: qm.get_submodule(site_module(name)).weight.numel()
              for name, q in _quantizers(qm) if q.is_weight}
    bit_of = {name: q.bits for name, q in _quantizers(qm)}
    results = []
    todo = dict(groups)
    if include_all:
        todo["all"] = [n for n in sizes if bit_of[n] < 32]
    for label, sites in todo.items():
        _enable_only(qm, set(sites))
        out = _logits(qm, eval_batches, device)
        acc = _acc(out, labels)
        site_bits = [bit_of[s] for s in sites if bit_of.get(s, 32) < 32]
        results.append(SensitivityResult(label, list(sites), min(site_bits, default=32), acc, ref_acc - acc,
                                         _kl(ref, out), sum(params.get(s, 0) for s in sites)))
    return {"acc": ref_acc, "images": int(labels.numel())}, results
