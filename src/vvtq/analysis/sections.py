"""The sections of the variation report (``report.analyze``). Each is an analysis that returns its numbers and a
``report_*`` function that draws its plots (into the report's folder) and writes its part of the report from
those numbers: 1. sensitivity, 2. distribution statistics, 3. weight histograms, 4. oscillation, 5. comparison
with a second checkpoint, 6. a mixed-precision proposal."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quant import int_range, mse_fit_scale
from ..quant.config import EDGE_KINDS
from . import plots
from .document import Report
from .mixed_precision import average_bits, layer_params, layer_sensitivity, propose_bits, write_overrides
from .sensitivity import block_groups, kind_groups, module_groups, run_sensitivity
from .stats import ModelStats, _expand, _group_rows, as_analysis_model, collect_statistics


@dataclass
class Subject:
    """The model under analysis and what every section needs: its metadata, the calibration (training) and
    evaluation batches, the bit-width of the PTQ sweep, the device and the name the report gives it."""

    model: nn.Module
    meta: dict[str, Any]
    calib: list
    evalb: list
    bits: int = 2
    device: torch.device = torch.device("cpu")
    name: str = "checkpoint"

    @property
    def quantized(self) -> bool:
        return self.meta.get("quant") is not None

    @property
    def mode(self) -> str:
        """``learned`` (the checkpoint's own quantizers) or ``ptq`` (an FP checkpoint, quantized at ``bits``)."""
        return "learned" if self.quantized else "ptq"


def precision_label(meta: dict[str, Any]) -> str:
    """``FP`` or ``WxAy`` for a checkpoint's metadata."""
    q = meta.get("quant")
    return "FP" if q is None else f"W{q['wbits']}A{q['abits']}"


@torch.no_grad()
def accuracy(model: nn.Module, batches: list, device: torch.device) -> tuple[float, torch.Tensor]:
    """Top-1 (%) of ``model`` on the batches, and its logits (on the CPU)."""
    model.eval()
    logits = torch.cat([model(x.to(device)).float().cpu() for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    return 100.0 * float((logits.argmax(1) == labels).float().mean()), logits


def report_intro(s: Subject, res: dict[str, Any], rep: Report) -> None:
    """The title and what the numbers below are measured on."""
    rep.h(1, f"Variation report: {s.name}")
    rep.p(f"Model `{s.meta.get('model')}` ({precision_label(s.meta)}), top-1 {res['acc']:.2f}% on "
          f"{res['eval_images']} evaluation images; activation statistics from {res['calib_images']} calibration "
          "(training) images. "
          + ("Sensitivity uses the checkpoint's learned quantizers (one group on, the rest off)."
             if s.quantized else f"Sensitivity is post-training quantization at {s.bits} bits (edges at 8), one "
             "group at a time, scales calibrated on FP inputs, no training."))


# ------------------------------------------------------------------------------------------------ 1. sensitivity
def sensitivity(s: Subject) -> dict[str, Any]:
    """Top-1 drop and KL to the reference with one module kind, block or layer weight quantized at a time."""
    kinds, blocks = kind_groups(s.model), block_groups(s.model)
    ref, sens = run_sensitivity(s.model, s.evalb, {**kinds, **blocks}, bits=s.bits, mode=s.mode,
                                calib_batches=s.calib, device=s.device, include_all=True)
    _ref, layers = run_sensitivity(s.model, s.evalb, module_groups(s.model), bits=s.bits, mode=s.mode,
                                   device=s.device)
    return {"reference_acc": ref["acc"],
            "kinds": [r.to_dict() for r in sens if r.label in kinds or r.label == "all"],
            "blocks": [r.to_dict() for r in sens if r.label in blocks],
            "layers": [r.to_dict() for r in layers]}


def report_sensitivity(s: Subject, sens: dict[str, Any], rep: Report) -> None:
    """Bar charts per module kind, block and layer weight, and the per-kind table."""
    rep.h(2, "1. Module sensitivity")
    how = s.mode + ("" if s.quantized else f", {s.bits}-bit")
    for key, what in (("kinds", "module kind"), ("blocks", "block"), ("layers", "layer weight")):
        plots.sensitivity_bars(sens[key], rep.out / f"sensitivity_{key}.png", f"one {what} quantized at a time ({how})")
    rep.img(rep.out / "sensitivity_kinds.png", "sensitivity per module kind")
    rep.p(f"Reference (all quantizers off): top-1 {sens['reference_acc']:.2f}%. `all` = every site quantized "
          "together.")
    rep.table(["group", "bits", "top-1 %", "drop", "KL"],
              [[r["label"], r["bits"], r["acc"], r["drop"], r["kl"]] for r in sens["kinds"]])
    rep.img(rep.out / "sensitivity_blocks.png", "sensitivity per block")
    rep.img(rep.out / "sensitivity_layers.png", "sensitivity per layer weight")


# ------------------------------------------------------------------------------------------------ 2. statistics
def statistics(s: Subject, model: nn.Module | None = None) -> ModelStats:
    """Std, kurtosis, outlier ratio and clipping of every site (of ``model``, default the subject's)."""
    return collect_statistics(s.model if model is None else model, s.calib, ref_bits=s.bits, device=s.device)


def kind_summary(stats: ModelStats) -> dict[tuple[str, str], dict[str, float]]:
    """Mean over blocks of std, kurtosis, outlier ratio and clip fraction per (tensor, kind)."""
    acc: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in stats.rows():
        acc.setdefault((r["tensor"], r["kind"]), []).append(r)
    return {key: {m: float(sum(r[m] for r in rows) / len(rows)) for m in ("std", "kurtosis", "outlier", "clip_frac")}
            for key, rows in acc.items()}


def _statistics_plots(stats: ModelStats, rep: Report) -> None:
    for metric in ("kurtosis", "std"):
        for tensor in ("weight", "act"):
            layers, kcols, m = stats.matrix(metric, tensor)
            if layers:
                fname = f"{metric}_{tensor}s.png"
                plots.heatmap(m, layers, kcols, rep.out / fname, f"{metric} of {tensor}s (block x kind)", log=True)
                rep.img(rep.out / fname, f"{metric} heat map of {tensor}s")
        panels = [(k, *stats.head_matrix(metric, k)) for k in stats.head_kinds()]
        if panels:
            fname = f"{metric}_heads.png"
            plots.head_heatmaps(panels, rep.out / fname, f"{metric} per head (block x head)", log=True)
            rep.img(rep.out / fname, f"{metric} per attention head")


def report_statistics(s: Subject, stats: ModelStats, heads: list[dict[str, Any]], rep: Report) -> None:
    """Heat maps per site and per head, the per-kind means and the heads that stand out."""
    rep.h(2, "2. Distribution statistics (std, kurtosis, outliers, clipping)")
    rep.p("Kurtosis = E[(x-mu)^4]/sigma^4 (3 for a Gaussian); outlier = max|x-mu|/sigma; clip = fraction of "
          "values outside [Qn, Qp] at the " + ("learned scales." if s.quantized else
                                               f"MSE-fitted {s.bits}-bit scales (edges 8-bit)."))
    _statistics_plots(stats, rep)
    rep.table(["tensor", "kind", "std (mean)", "kurtosis (mean)", "outlier (mean)", "clip (mean)"],
              [[t, k, v["std"], v["kurtosis"], v["outlier"], v["clip_frac"]]
               for (t, k), v in kind_summary(stats).items()])
    rep.p("Heads that stand out from the other heads of the same site (score = max of std and kurtosis "
          "relative to the site's median head):")
    rep.table(["site", "head", "std", "std / median", "kurtosis", "kurt / median", "outlier"],
              [[r["site"], r["head"], r["std"], r["std_ratio"], r["kurtosis"], r["kurt_ratio"], r["outlier"]]
               for r in heads])


# ------------------------------------------------------------------------------------------------ 3. histograms
def _weight_panel(model: nn.Module, layer: str, bits: int, title: str) -> dict[str, Any]:
    """``w / s`` of one layer (the learned scale, else an MSE fit at ``bits``) for a histogram."""
    mod = as_analysis_model(model).get_submodule(layer)
    q, w = mod.weight_quant, mod.weight.detach().float()
    if q.enabled and bool(q.initialized):
        s, qmin, qmax, src = q.expanded_scale(w).detach(), q.qmin, q.qmax, f"learned, {q.bits}-bit"
    else:
        b = 8 if q.kind in EDGE_KINDS else bits
        qmin, qmax = int_range(b, True)
        s = _expand(mse_fit_scale(_group_rows(w, q.axis, q.num_groups), qmin, qmax), w, q.axis, q.num_groups)
        src = f"MSE fit, {b}-bit"
    return {"title": f"{title}: {layer} ({src})", "values": (w / s).flatten().cpu().numpy(), "qmin": qmin,
            "qmax": qmax}


def report_weight_histograms(s: Subject, layer_rows: list[dict[str, Any]], rep: Report) -> None:
    """Histograms of ``w / s`` of the most and the least sensitive layer (by KL) with their levels."""
    rep.h(2, "3. Weights of the most and least sensitive layers")
    if not layer_rows:
        return
    ranked = sorted(layer_rows, key=lambda r: r["kl"])
    hi, lo = ranked[-1]["label"], ranked[0]["label"]
    plots.weight_histograms([_weight_panel(s.model, hi, s.bits, "most sensitive"),
                             _weight_panel(s.model, lo, s.bits, "least sensitive")], rep.out / "weight_histograms.png")
    rep.p(f"Most sensitive layer: `{hi}` (KL {ranked[-1]['kl']:.4g}); least: `{lo}` (KL {ranked[0]['kl']:.4g}). "
          "Each weight is divided by its own step size, so the integer levels Qn..Qp are the dashed lines.")
    rep.img(rep.out / "weight_histograms.png", "weight histograms with quantization levels")


# ------------------------------------------------------------------------------------------------ 4. oscillation
def oscillation_records(metrics: str | Path) -> list[dict[str, Any]]:
    """The logged training steps of a ``metrics.jsonl`` that carry oscillation metrics."""
    recs = []
    for line in Path(metrics).read_text().splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue  # a line cut by a running writer
        if isinstance(rec, dict) and rec.get("type") == "step" and "osc/overall" in rec:
            recs.append(rec)
    return recs


def oscillation_summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The oscillating fraction at the end and at most, and every layer's fraction at the last step."""
    last = recs[-1]
    return {"steps": len(recs), "final_overall": last["osc/overall"],
            "max_overall": max(r["osc/overall"] for r in recs),
            "final": {k: v for k, v in last.items() if k.startswith("osc/")}}


def report_oscillation(metrics: str | None, recs: list[dict[str, Any]], rep: Report) -> None:
    """The oscillation curves and the layers that oscillate most at the end (or why there are none)."""
    rep.h(2, "4. Weight oscillation during training")
    if not metrics:
        rep.p("No training metrics given (`--metrics RUN/metrics.jsonl`).")
        return
    if not recs:
        rep.p(f"`{metrics}` has no oscillation metrics (train with an `oscillation:` section).")
        return
    summary = oscillation_summary(recs)
    plots.oscillation_curves(recs, rep.out / "oscillation.png", "oscillating weights (EMA freq > threshold)")
    rep.p(f"From `{metrics}`: {len(recs)} logged steps; oscillating fraction at the end "
          f"{summary['final_overall']:.4f}, at most {summary['max_overall']:.4f}.")
    rep.img(rep.out / "oscillation.png", "oscillation curves")
    top = sorted(((k[4:], v) for k, v in summary["final"].items() if k not in ("osc/overall", "osc/frozen")),
                 key=lambda kv: -kv[1])[:8]
    rep.table(["layer (final step)", "oscillating fraction"], [list(t) for t in top])


# ------------------------------------------------------------------------------------------------ 5. comparison
def comparison(s: Subject, logits: torch.Tensor, other: nn.Module, ometa: dict[str, Any], oname: str,
               ) -> tuple[dict[str, Any], ModelStats]:
    """The second checkpoint's top-1, output KL and top-1 agreement with the subject, and its statistics."""
    oacc, ologits = accuracy(other, s.evalb, s.device)
    ostats = statistics(s, other)
    kl = float(torch.nn.functional.kl_div(logits.log_softmax(-1), ologits.log_softmax(-1), log_target=True,
                                          reduction="batchmean"))
    agree = 100.0 * float((logits.argmax(1) == ologits.argmax(1)).float().mean())
    return {"checkpoint": oname, "precision": precision_label(ometa), "acc": oacc, "kl": kl, "agreement": agree,
            "stats": ostats.to_dict()}, ostats


def report_comparison(s: Subject, res: dict[str, Any], stats: ModelStats, ostats: ModelStats, rep: Report) -> None:
    """Top-1 side by side, output divergence and agreement, and the per-kind statistics of both."""
    cmp = res["compare"]
    a, b = precision_label(s.meta), cmp["precision"]
    rep.h(2, f"5. Comparison with {cmp['checkpoint']}")
    rep.table(["", f"this ({a})", f"other ({b})"], [["top-1 %", res["acc"], cmp["acc"]]])
    rep.p(f"Output divergence KL(other ‖ this) = {cmp['kl']:.4g}; the two agree on the top-1 class for "
          f"{cmp['agreement']:.2f}% of the {res['eval_images']} images. Statistics per kind (mean over blocks):")
    mine, theirs = kind_summary(stats), kind_summary(ostats)
    rows = []
    for key in dict.fromkeys([*mine, *theirs]):
        s1, s2 = mine.get(key, {}), theirs.get(key, {})
        rows.append([key[0], key[1], *[d.get(m, math.nan) for m in ("std", "kurtosis", "clip_frac") for d in (s1, s2)]])
    rep.table(["tensor", "kind", f"std {a}", f"std {b}", f"kurt {a}", f"kurt {b}", f"clip {a}", f"clip {b}"], rows)


# ------------------------------------------------------------------------------------------------ 6. mixed precision
def mixed_precision(s: Subject, layer_rows: list[dict[str, Any]], budget: float, choices: tuple[int, ...],
                    ) -> dict[str, Any]:
    """A bit-width per layer within ``budget`` average weight bits, greedy on PTQ KL per bit-cost."""
    params = layer_params(s.model)
    known = {s.bits: {r["label"]: r["kl"] for r in layer_rows}} if s.mode == "ptq" and s.bits in choices else {}
    table = layer_sensitivity(s.model, s.evalb, choices, device=s.device, known=known)
    assign = propose_bits(table, params, budget, choices)
    return {"budget": budget, "average_bits": average_bits(assign, params), "assignment": assign,
            "sensitivity": {k: {str(b): v for b, v in d.items()} for k, d in table.items()}, "params": params}


def write_mixed_precision(mp: dict[str, Any], path: Path, name: str, choices: tuple[int, ...]) -> Path:
    """The proposal as a ``QuantConfig`` override file (``vvtq train --overrides-file``)."""
    return write_overrides(mp["assignment"], path, header=(
        f"vvtq analyze --bit-budget {mp['budget']:g}: {name}\n"
        f"average weight bits over the transformer blocks {mp['average_bits']:.4f} (by parameter count)\n"
        f"greedy on PTQ KL sensitivity per bit-cost; choices {list(choices)}\n"
        "use: vvtq train --config RECIPE --overrides-file mixed_precision.yaml"))


def report_mixed_precision(mp: dict[str, Any], choices: tuple[int, ...], rep: Report) -> None:
    """The proposal's file, its average bit-width and the KL of each layer at each choice."""
    rep.h(2, f"6. Mixed-precision proposal at {mp['budget']:g} average weight bits")
    rep.p(f"Written to `{Path(mp['file']).name}`: average {mp['average_bits']:.3f} bits (budget {mp['budget']:g}). "
          "Use with `vvtq train --config RECIPE --overrides-file mixed_precision.yaml`.")
    rep.p("KL@b: the layer's weights alone at b bits (PTQ). Choices of 8 bits and more are taken as "
          "lossless (KL 0) and not measured.")
    table, params, assign = mp["sensitivity"], mp["params"], mp["assignment"]
    rep.table(["layer", "params", "bits", *[f"KL@{b}" for b in choices]],
              [[k, params[k], assign[k], *[table[k].get(str(b), math.nan) for b in choices]] for k in assign])
