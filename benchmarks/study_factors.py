"""The factors of a W2A2 study: each changes one thing of a baseline recipe mapping, written ``kd+crops=2+md``.

Shared by the Fashion-MNIST study (``accuracy_v2.py``) and the CIFAR-10 study (``cifar10.py``); a study may replace
an entry (CIFAR-10's ``kd`` reads a soft-label file). ``Context`` says what a factor can point at: the student's own
FP checkpoint, the other architecture's, a stronger CNN, and the teacher mapping ``kd`` sets.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from study_runs import StudyError


@dataclass(frozen=True)
class Context:
    model: str
    teacher: str  # this model's FP checkpoint (QAT starts from it; 'kd' distils from it unless ``kd`` says else)
    other_teacher: str | None  # the other architecture's, for the ensemble
    cnn_teacher: str | None = None  # the stronger CNN teacher (factor 'cnn')
    kd: dict[str, Any] | None = None  # the teacher mapping 'kd' sets (default: live, ``teacher``)
    kd_crops: dict[str, Any] | None = None  # the crop settings of the crops ``kd`` labels, where it fixes them


def _f_kd(spec, ctx, v):
    kd = ctx.kd or {"source": "live", "checkpoint": ctx.teacher}
    spec["teacher"] = {**kd, **{k: v for k, v in (spec.get("teacher") or {}).items() if k == "hard_weight"}}


def _needs_kd(spec: dict, what: str, live: bool = False) -> None:
    source = (spec.get("teacher") or {}).get("source")
    if source in (None, "none"):
        raise StudyError(f"factor {what!r} needs 'kd' before it")
    if live and source != "live":
        raise StudyError(f"factor {what!r} averages live teachers; this study's 'kd' reads a soft-label file")


def _f_hard(spec, ctx, v):
    _needs_kd(spec, "hard")
    spec["teacher"]["hard_weight"] = float(v or _DEFAULTS["hard"])


def _f_ens(spec, ctx, v):
    _needs_kd(spec, "ens", live=True)
    if ctx.other_teacher is None:
        raise StudyError("factor 'ens' needs both teachers")
    spec["teacher"]["checkpoint"] = [ctx.teacher, ctx.other_teacher]


def _f_cnn(spec, ctx, v):
    _needs_kd(spec, "cnn", live=True)
    if ctx.cnn_teacher is None:
        raise StudyError("factor 'cnn' needs the CNN teacher")
    ckpt = spec["teacher"]["checkpoint"]
    spec["teacher"]["checkpoint"] = [*ckpt, ctx.cnn_teacher] if isinstance(ckpt, list) else ctx.cnn_teacher


def _f_crops(spec, ctx, v):
    spec["num_crops"] = int(v)


def _f_wide(spec, ctx, v):
    spec["crop_scale"] = [0.35, 1.0]


def _f_md(spec, ctx, v):
    spec["quant"] = {**spec["quant"], "preset": "vvtq"}


def _f_lnch(spec, ctx, v):
    table = {**(spec["quant"].get("act_granularity") or {}), "attn_in": "channel", "mlp_in": "channel"}
    spec["quant"] = {**spec["quant"], "act_granularity": table}


def _f_sgelu(spec, ctx, v):
    spec["quant"] = {**spec["quant"], "gelu_signed": True}


def _f_qlr(spec, ctx, v):
    spec["quant_lr_scale"] = float(v)


def _f_wqlr(spec, ctx, v):
    spec["weight_quant_lr_scale"] = float(v)


def _f_lr(spec, ctx, v):
    spec["lr"] = float(v)


def _f_reg(spec, ctx, v):
    spec["regularizer"] = {"lambda_max": 0.01, "start_frac": 0.25}


def _f_regn(spec, ctx, v):
    spec["regularizer"] = {"lambda_max": float(v or _DEFAULTS["regn"]), "start_frac": 0.5, "units": "step",
                           "bins": "group", "weighting": "size"}


def _f_freeze(spec, ctx, v):
    threshold = float(v or _DEFAULTS["freeze"])
    spec["oscillation"] = {**(spec.get("oscillation") or {"every": 1}), "freeze_threshold": threshold}


def _f_cga(spec, ctx, v):
    spec["anneal"] = {"start_frac": float(v or _DEFAULTS["cga"])}


def _f_single(spec, ctx, v):
    if spec["num_crops"] < 2:
        raise StudyError("factor 'single' needs 'crops=K' (K > 1) before it")
    spec["single_crop_frac"] = float(v or _DEFAULTS["single"])


# name: (label, how it changes the recipe mapping)
FACTORS = {
    "kd": ("soft labels of the live FP teacher (its own crop scale, 1 crop)", _f_kd),
    "hard": ("+ the hard label, weight {v}", _f_hard),
    "ens": ("teacher = the mean of both architectures' teachers", _f_ens),
    "cnn": ("teacher = a narrow ResNet-18 trained here (stronger than the student; after 'ens': joins the mean)",
            _f_cnn),
    "crops": ("{v} crops per image ({v}x fewer distinct images)", _f_crops),
    "wide": ("crop area [0.35, 1] (the published recipe's; the teacher's is [0.8, 1])", _f_wide),
    "md": ("module-dependent quantizers (split q/k/v, per-channel weights, per-head activations, GELU offset)",
           _f_md),
    "lnch": ("a step size per channel for the LayerNorm outputs (the attention and MLP inputs; RepQ-ViT)",
             _f_lnch),
    "sgelu": ("GELU output quantized signed (the old, weak baseline)", _f_sgelu),
    "qlr": ("quantizer step sizes at {v} x the weights' lr", _f_qlr),
    "wqlr": ("weight quantizers' step sizes at {v} x the lr (0: fixed at their MSE fit, as OFQ's StatsQ keeps "
             "them out of the optimizer)", _f_wqlr),
    "lr": ("weights' lr {v}", _f_lr),
    "reg": ("published bin regularizer (lambda 0.01, from 25%, bins per tensor)", _f_reg),
    "regn": ("bin regularizer in steps, bins per channel, size-weighted, lambda {v}, from 50%", _f_regn),
    "freeze": ("iterative freezing of weights oscillating above frequency {v} (Nagel et al.)", _f_freeze),
    "cga": ("confidence-guided annealing of the low-bit weights from {v} of the run (OFQ)", _f_cga),
    "single": ("the last {v} of the steps take 1 crop an image (the published single-crop final phase)", _f_single),
}


# a factor's value when the recipe names none
_DEFAULTS = {"hard": 0.5, "regn": 1.0, "freeze": 0.02, "cga": 0.8, "single": 0.2}


Factor = Callable[[dict, Context, "str | None"], None]
Table = dict[str, tuple[str, Factor]]


def parse_factors(recipe: str, table: Table = FACTORS) -> list[tuple[str, str | None]]:
    """``kd+crops=2`` -> ``[("kd", None), ("crops", "2")]``; every name must be in ``table``."""
    out = []
    for part in filter(None, recipe.split("+")):
        name, _, value = part.partition("=")
        if name not in table:
            raise StudyError(f"unknown factor {name!r} in recipe {recipe!r}; known: {', '.join(table)}")
        out.append((name, value or None))
    return out


def apply_factors(spec: dict[str, Any], recipe: str, ctx: Context, table: Table = FACTORS) -> None:
    """Change the recipe mapping ``spec`` by each factor of ``recipe``, left to right."""
    for name, value in parse_factors(recipe, table):
        table[name][1](spec, ctx, value)


def recipe_key(recipe: str) -> str:
    """A file-name-safe key: ``kd+crops=2`` -> ``kd_crops2``; the baseline is ``lsq``."""
    return recipe.replace("=", "").replace("+", "_").replace(".", "p").replace("-", "m") or "lsq"


def describe(recipe: str, table: Table = FACTORS) -> str:
    """A reader's description of ``recipe``, one clause a factor."""
    return "; ".join(table[n][0].format(v=v or _DEFAULTS.get(n)) for n, v in parse_factors(recipe, table)) \
        or "LSQ baseline"
