"""``vvtq analyze``: the variation report of a checkpoint (docs/METHOD.md §1; VVTQ §3).

Writes into ``--out``: ``report.md`` (linking the PNGs), ``report.html`` (the PNGs embedded as base64),
the PNGs, ``analysis.json`` (every number, to re-draw without re-running) and, with ``--bit-budget``,
``mixed_precision.yaml`` (a ``QuantConfig`` override file). Sections:

1. sensitivity per module kind and per block (top-1 drop and KL to FP; PTQ at ``--bits`` for an FP checkpoint,
   the learned quantizers for a quantized one) and per layer weight;
2. std / kurtosis / outlier ratio / clipping per site and per head (``stats.py``) as heat maps and tables;
3. weight histograms of the most and least sensitive layers with their quantization levels;
4. oscillation curves from a training run's ``metrics.jsonl`` (``--metrics``);
5. a side-by-side comparison with a second checkpoint (``--compare``);
6. a mixed-precision proposal (``--bit-budget``, ``mixed_precision.py``).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import EvalDataset, SubsetImageDataset
from ..data.splits import eval_split
from ..errors import ConfigError
from ..quant import int_range, mse_fit_scale
from ..quant.config import EDGE_KINDS
from . import plots
from .mixed_precision import (
    DEFAULT_CHOICES,
    average_bits,
    layer_params,
    layer_sensitivity,
    propose_bits,
    write_overrides,
)
from .sensitivity import block_groups, kind_groups, module_groups, run_sensitivity
from .stats import ModelStats, _expand, _group_rows, as_analysis_model, collect_statistics, outlier_heads

__all__ = ["Report", "analyze", "load_batches", "run_analyze"]


# ------------------------------------------------------------------------------------------------ document
class Report:
    """A list of blocks rendered both to Markdown (images linked) and HTML (images embedded)."""

    def __init__(self, out: Path):
        self.out, self.blocks = out, []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", headers, rows))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", Path(path).name, alt))

    @staticmethod
    def _fmt(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "–"
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    def markdown(self) -> str:
        lines = []
        for b in self.blocks:
            if b[0] == "h":
                lines += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                lines += [b[1], ""]
            elif b[0] == "table":
                lines.append("| " + " | ".join(b[1]) + " |")
                lines.append("|" + "---|" * len(b[1]))
                lines += ["| " + " | ".join(self._fmt(v) for v in row) + " |" for row in b[2]]
                lines.append("")
            else:
                lines += [f"![{b[2]}]({b[1]})", ""]
        return "\n".join(lines)

    def html(self, title: str) -> str:
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em}"
                 "table{border-collapse:collapse;font-size:12px;margin:0.5em 0}"
                 "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}"
                 "td:first-child{text-align:left}img{max-width:100%}code{background:#f4f4f4}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
                cells = ["".join(f"<td>{html.escape(self._fmt(v))}</td>" for v in row) for row in b[2]]
                body = "".join(f"<tr>{c}</tr>" for c in cells)
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
            else:
                data = base64.b64encode((self.out / b[1]).read_bytes()).decode()
                parts.append(f"<p><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'></p>")
        parts.append("</body></html>")
        return "\n".join(parts)


def _inline(text: str) -> str:
    """Escape, then render Markdown ``code`` spans."""
    out, code = [], False
    for piece in html.escape(text).split("`"):
        out.append(f"<code>{piece}</code>" if code else piece)
        code = not code
    return "".join(out)


# ------------------------------------------------------------------------------------------------ data
def load_batches(data: str, split: str, root: str | None, count: int, img_size: int, mean, std,
                 batch_size: int = 128, shuffle_seed: int | None = None, holdout: int = 0,
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` images of a split as a list of normalised ``(x, y)`` batches: the first ones, or a seeded
    random choice when ``shuffle_seed`` is given."""
    base = eval_split(data, split, root, holdout)
    count = min(count, len(base))
    if shuffle_seed is None:
        idx = range(count)
    else:
        gen = torch.Generator().manual_seed(shuffle_seed)
        idx = torch.randperm(len(base), generator=gen)[:count].tolist()
    ds = EvalDataset(SubsetImageDataset(base, idx), img_size, mean, std)
    return list(DataLoader(ds, batch_size=batch_size, shuffle=False))


@torch.no_grad()
def _accuracy(model: nn.Module, batches, device) -> tuple[float, torch.Tensor]:
    model.eval()
    logits = torch.cat([model(x.to(device)).float().cpu() for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    return 100.0 * float((logits.argmax(1) == labels).float().mean()), logits


# ------------------------------------------------------------------------------------------------ analysis
def _weight_panel(model: nn.Module, layer: str, bits: int, title: str) -> dict[str, Any]:
    """``w / s`` of one layer (the learned scale, else an MSE fit at ``bits``) for a histogram."""
    qm = as_analysis_model(model)
    mod = qm.get_submodule(layer)
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


def _kind_summary(stats: ModelStats) -> dict[tuple[str, str], dict[str, float]]:
    """Mean over blocks of std, kurtosis, outlier ratio and clip fraction per (tensor, kind)."""
    acc: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in stats.rows():
        acc.setdefault((r["tensor"], r["kind"]), []).append(r)
    out = {}
    for key, rows in acc.items():
        out[key] = {m: float(sum(r[m] for r in rows) / len(rows)) for m in ("std", "kurtosis", "outlier",
                                                                             "clip_frac")}
    return out


def _read_metrics(path: str | Path) -> list[dict[str, Any]]:
    recs = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a running writer
    return recs


def _label(meta: dict[str, Any]) -> str:
    q = meta.get("quant")
    return "FP" if q is None else f"W{q['wbits']}A{q['abits']}"


def analyze(model: nn.Module, meta: dict[str, Any], calib: list, evalb: list, out: str | Path, *,
            bits: int = 2, device: torch.device | str = "cpu", metrics: str | None = None,
            compare: tuple[nn.Module, dict[str, Any], str] | None = None, bit_budget: float | None = None,
            choices: tuple[int, ...] = DEFAULT_CHOICES, name: str = "checkpoint") -> dict[str, Any]:
    """Run every analysis on ``model`` and write the report into ``out``; returns the numbers (also written
    as ``analysis.json``)."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    quantized = meta.get("quant") is not None
    mode = "learned" if quantized else "ptq"
    rep = Report(out)
    res: dict[str, Any] = {"checkpoint": name, "model": meta.get("model"), "precision": _label(meta),
                           "bits": bits, "mode": mode, "calib_images": sum(len(b[1]) for b in calib),
                           "eval_images": sum(len(b[1]) for b in evalb)}
    acc, logits = _accuracy(model, evalb, device)
    res["acc"] = acc

    rep.h(1, f"Variation report: {name}")
    rep.p(f"Model `{meta.get('model')}` ({_label(meta)}), top-1 {acc:.2f}% on {res['eval_images']} "
          "evaluation "
          f"images; activation statistics from {res['calib_images']} calibration (training) images. "
          + ("Sensitivity uses the checkpoint's learned quantizers (one group on, the rest off)."
             if quantized else f"Sensitivity is post-training quantization at {bits} bits (edges at 8), one "
             "group at a time, scales calibrated on FP inputs, no training."))

    # 1. sensitivity ---------------------------------------------------------------------------------
    rep.h(2, "1. Module sensitivity")
    kinds, blocks = kind_groups(model), block_groups(model)
    ref, sens = run_sensitivity(model, evalb, {**kinds, **blocks}, bits=bits, mode=mode, calib_batches=calib,
                                device=device, include_all=True)
    kind_rows = [r.to_dict() for r in sens if r.label in kinds or r.label == "all"]
    block_rows = [r.to_dict() for r in sens if r.label in blocks]
    _ref, layer_res = run_sensitivity(model, evalb, module_groups(model), bits=bits, mode=mode, device=device)
    layer_rows = [r.to_dict() for r in layer_res]
    res["sensitivity"] = {"reference_acc": ref["acc"], "kinds": kind_rows, "blocks": block_rows,
                          "layers": layer_rows}
    for rows, fname, what in ((kind_rows, "sensitivity_kinds.png", "module kind"),
                              (block_rows, "sensitivity_blocks.png", "block"),
                              (layer_rows, "sensitivity_layers.png", "layer weight")):
        plots.sensitivity_bars(rows, out / fname, f"one {what} quantized at a time ({mode}"
                               + ("" if quantized else f", {bits}-bit") + ")")
    rep.img(out / "sensitivity_kinds.png", "sensitivity per module kind")
    rep.p(f"Reference (all quantizers off): top-1 {ref['acc']:.2f}%. `all` = every site quantized together.")
    rep.table(["group", "bits", "top-1 %", "drop", "KL"],
              [[r["label"], r["bits"], r["acc"], r["drop"], r["kl"]] for r in kind_rows])
    rep.img(out / "sensitivity_blocks.png", "sensitivity per block")
    rep.img(out / "sensitivity_layers.png", "sensitivity per layer weight")

    # 2. statistics ---------------------------------------------------------------------------------
    rep.h(2, "2. Distribution statistics (std, kurtosis, outliers, clipping)")
    stats = collect_statistics(model, calib, ref_bits=bits, device=device)
    res["stats"] = stats.to_dict()
    rep.p("Kurtosis = E[(x-mu)^4]/sigma^4 (3 for a Gaussian); outlier = max|x-mu|/sigma; clip = fraction of "
          "values outside [Qn, Qp] at the " + ("learned scales." if quantized else
                                               f"MSE-fitted {bits}-bit scales (edges 8-bit)."))
    for metric in ("kurtosis", "std"):
        for tensor in ("weight", "act"):
            layers, kcols, m = stats.matrix(metric, tensor)
            if layers:
                fname = f"{metric}_{tensor}s.png"
                plots.heatmap(m, layers, kcols, out / fname, f"{metric} of {tensor}s (block x kind)",
                              log=True)
                rep.img(out / fname, f"{metric} heat map of {tensor}s")
        panels = [(k, *stats.head_matrix(metric, k)) for k in stats.head_kinds()]
        if panels:
            fname = f"{metric}_heads.png"
            plots.head_heatmaps(panels, out / fname, f"{metric} per head (block x head)", log=True)
            rep.img(out / fname, f"{metric} per attention head")
    summary = _kind_summary(stats)
    rep.table(["tensor", "kind", "std (mean)", "kurtosis (mean)", "outlier (mean)", "clip (mean)"],
              [[t, k, v["std"], v["kurtosis"], v["outlier"], v["clip_frac"]]
               for (t, k), v in summary.items()])
    heads = outlier_heads(stats, top=10)
    res["outlier_heads"] = heads
    rep.p("Heads that stand out from the other heads of the same site (score = max of std and kurtosis "
          "relative to the site's median head):")
    rep.table(["site", "head", "std", "std / median", "kurtosis", "kurt / median", "outlier"],
              [[r["site"], r["head"], r["std"], r["std_ratio"], r["kurtosis"], r["kurt_ratio"], r["outlier"]]
               for r in heads])

    # 3. histograms -----------------------------------------------------------------------------------
    rep.h(2, "3. Weights of the most and least sensitive layers")
    if layer_rows:
        ranked = sorted(layer_rows, key=lambda r: r["kl"])
        hi, lo = ranked[-1]["label"], ranked[0]["label"]
        plots.weight_histograms([_weight_panel(model, hi, bits, "most sensitive"),
                                 _weight_panel(model, lo, bits, "least sensitive")],
                                out / "weight_histograms.png")
        rep.p(f"Most sensitive layer: `{hi}` (KL {ranked[-1]['kl']:.4g}); least: `{lo}` "
              f"(KL {ranked[0]['kl']:.4g}). Each weight is divided by its own step size, so the integer "
              "levels Qn..Qp are the dashed lines.")
        rep.img(out / "weight_histograms.png", "weight histograms with quantization levels")

    # 4. oscillation ----------------------------------------------------------------------------------
    rep.h(2, "4. Weight oscillation during training")
    if metrics:
        recs = [r for r in _read_metrics(metrics) if r.get("type") == "step" and "osc/overall" in r]
        if recs:
            plots.oscillation_curves(recs, out / "oscillation.png",
                                     "oscillating weights (EMA freq > threshold)")
            last = recs[-1]
            res["oscillation"] = {"steps": len(recs), "final_overall": last["osc/overall"],
                                  "max_overall": max(r["osc/overall"] for r in recs),
                                  "final": {k: v for k, v in last.items() if k.startswith("osc/")}}
            rep.p(f"From `{metrics}`: {len(recs)} logged steps; oscillating fraction at the end "
                  f"{last['osc/overall']:.4f}, at most {res['oscillation']['max_overall']:.4f}.")
            rep.img(out / "oscillation.png", "oscillation curves")
            top = sorted(((k[4:], v) for k, v in last.items() if k.startswith("osc/") and k not in
                          ("osc/overall", "osc/frozen")), key=lambda kv: -kv[1])[:8]
            rep.table(["layer (final step)", "oscillating fraction"], [list(t) for t in top])
        else:
            rep.p(f"`{metrics}` has no oscillation metrics (train with an `oscillation:` section).")
    else:
        rep.p("No training metrics given (`--metrics RUN/metrics.jsonl`).")

    # 5. comparison -----------------------------------------------------------------------------------
    if compare is not None:
        other, ometa, oname = compare
        rep.h(2, f"5. Comparison with {oname}")
        oacc, ologits = _accuracy(other, evalb, device)
        ostats = collect_statistics(other, calib, ref_bits=bits, device=device)
        kl = float(torch.nn.functional.kl_div(logits.log_softmax(-1), ologits.log_softmax(-1),
                                              log_target=True, reduction="batchmean"))
        agree = 100.0 * float((logits.argmax(1) == ologits.argmax(1)).float().mean())
        a, b = _label(meta), _label(ometa)
        rep.table(["", f"this ({a})", f"other ({b})"], [["top-1 %", acc, oacc]])
        rep.p(f"Output divergence KL(other ‖ this) = {kl:.4g}; the two agree on the top-1 class for "
              f"{agree:.2f}% of the {res['eval_images']} images. Statistics per kind (mean over blocks):")
        osum = _kind_summary(ostats)
        rows = []
        for key in list(dict.fromkeys([*summary, *osum])):
            s1, s2 = summary.get(key, {}), osum.get(key, {})
            rows.append([key[0], key[1], s1.get("std", math.nan), s2.get("std", math.nan),
                         s1.get("kurtosis", math.nan), s2.get("kurtosis", math.nan),
                         s1.get("clip_frac", math.nan), s2.get("clip_frac", math.nan)])
        rep.table(["tensor", "kind", f"std {a}", f"std {b}", f"kurt {a}", f"kurt {b}", f"clip {a}",
                   f"clip {b}"], rows)
        res["compare"] = {"checkpoint": oname, "precision": b, "acc": oacc, "kl": kl, "agreement": agree,
                          "stats": ostats.to_dict()}

    # 6. mixed precision ------------------------------------------------------------------------------
    if bit_budget is not None:
        rep.h(2, f"6. Mixed-precision proposal at {bit_budget:g} average weight bits")
        params = layer_params(model)
        known = {}
        if mode == "ptq" and bits in choices:
            known[bits] = {r["label"]: r["kl"] for r in layer_rows}
        table = layer_sensitivity(model, evalb, choices, device=device, known=known)
        assign = propose_bits(table, params, bit_budget, choices)
        avg = average_bits(assign, params)
        path = write_overrides(assign, out / "mixed_precision.yaml", header=(
            f"vvtq analyze --bit-budget {bit_budget:g}: {name}\n"
            f"average weight bits over the transformer blocks {avg:.4f} (by parameter count)\n"
            f"greedy on PTQ KL sensitivity per bit-cost; choices {list(choices)}\n"
            "use: vvtq train --config RECIPE --overrides-file mixed_precision.yaml"))
        res["mixed_precision"] = {"budget": bit_budget, "average_bits": avg, "assignment": assign,
                                  "sensitivity": {k: {str(b): v for b, v in d.items()}
                                                  for k, d in table.items()},
                                  "params": params, "file": str(path)}
        rep.p(f"Written to `{path.name}`: average {avg:.3f} bits (budget {bit_budget:g}). Use with "
              "`vvtq train --config RECIPE --overrides-file mixed_precision.yaml`.")
        rep.p("KL@b: the layer's weights alone at b bits (PTQ). Choices of 8 bits and more are taken as "
              "lossless (KL 0) and not measured.")
        rep.table(["layer", "params", "bits", *[f"KL@{b}" for b in choices]],
                  [[k, params[k], assign[k], *[table[k].get(b, math.nan) for b in choices]] for k in assign])

    res["wall_s"] = time.time() - t0
    (out / "analysis.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (out / "report.md").write_text(rep.markdown())
    (out / "report.html").write_text(rep.html(f"vvtq variation report: {name}"))
    return res


# ------------------------------------------------------------------------------------------------ CLI
def run_analyze(args: argparse.Namespace) -> dict[str, Any]:
    """The ``vvtq analyze`` command (see ``vvtq analyze --help``)."""
    from ..device import resolve_device
    from ..modelio import load_model

    device = resolve_device(args.device)
    model, meta = load_model(args.checkpoint, device)
    tc = meta.get("train_config") or {}
    data = args.data or tc.get("data")
    if not data:
        raise ConfigError(f"{args.checkpoint} records no dataset; pass --data")
    root = args.data_root or tc.get("data_root")
    img, mean, std = meta["img_size"], meta["mean"], meta["std"]
    calib = load_batches(data, "train", root, args.calib_images, img, mean, std, shuffle_seed=0)
    evalb = load_batches(data, tc.get("val_split", "test"), root, args.eval_images, img, mean, std,
                         batch_size=250, holdout=tc.get("holdout", 0))
    compare = None
    if args.compare:
        other, ometa = load_model(args.compare, device)
        if ometa["img_size"] != img:
            raise ConfigError(f"--compare {args.compare} takes {ometa['img_size']} px images, this one {img}")
        compare = (other, ometa, Path(args.compare).as_posix())
    choices = tuple(getattr(args, "bit_choices", None) or DEFAULT_CHOICES)
    res = analyze(model, meta, calib, evalb, args.out, bits=args.bits, device=device, metrics=args.metrics,
                  compare=compare, bit_budget=args.bit_budget, choices=choices,
                  name=Path(args.checkpoint).as_posix())
    print(f"wrote {Path(args.out) / 'report.md'} and report.html ({res['wall_s']:.0f} s)")
    if "mixed_precision" in res:
        mp = res["mixed_precision"]
        print(f"wrote {mp['file']}: average {mp['average_bits']:.3f} weight bits (budget {mp['budget']:g})")
    return res
