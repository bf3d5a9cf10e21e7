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

``analyze`` runs them in that order: each section's analysis (``sections.py``) gives numbers, its ``report_*``
function draws the plots and writes the section (``document.Report``), and ``write_report`` writes the files.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import EvalDataset, SubsetImageDataset
from ..data.splits import eval_split
from ..errors import ConfigError
from ..spec import data_source
from . import sections
from .document import Report
from .mixed_precision import DEFAULT_CHOICES
from .stats import outlier_heads

__all__ = ["AnalyzeOptions", "Report", "analyze", "load_batches", "run_analyze"]


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


# ------------------------------------------------------------------------------------------------ analysis
@dataclass
class AnalyzeOptions:
    """What ``analyze`` runs: the PTQ bit-width of the sensitivity sweep, the device, a training run's
    ``metrics.jsonl`` (oscillation), a second checkpoint ``(model, meta, name)`` to compare with, a mixed-precision
    budget (average weight bits) and its bit-width choices, and the name the report gives the checkpoint."""

    bits: int = 2
    device: torch.device | str = "cpu"
    metrics: str | None = None
    compare: tuple[nn.Module, dict[str, Any], str] | None = None
    bit_budget: float | None = None
    choices: tuple[int, ...] = DEFAULT_CHOICES
    name: str = "checkpoint"


def analyze(model: nn.Module, meta: dict[str, Any], calib: list, evalb: list, out: str | Path,
            options: AnalyzeOptions | None = None, **settings: Any) -> dict[str, Any]:
    """Run every analysis on ``model`` and write the report into ``out``; returns the numbers (also written
    as ``analysis.json``). ``options`` (or its fields as keywords: ``bits=3``, ``compare=...``) say what runs."""
    if options is not None and settings:
        raise TypeError("analyze: pass options or keyword settings, not both")
    opts = options or AnalyzeOptions(**settings)
    t0, out = time.time(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = sections.Subject(model, meta, calib, evalb, opts.bits, torch.device(opts.device), opts.name)
    rep = Report(out)
    acc, logits = sections.accuracy(model, evalb, s.device)
    res: dict[str, Any] = {"checkpoint": s.name, "model": meta.get("model"),
                           "precision": sections.precision_label(meta), "bits": s.bits, "mode": s.mode,
                           "calib_images": sum(len(b[1]) for b in calib), "eval_images": sum(len(b[1]) for b in evalb),
                           "acc": acc}
    sections.report_intro(s, res, rep)

    res["sensitivity"] = sens = sections.sensitivity(s)
    sections.report_sensitivity(s, sens, rep)

    stats = sections.statistics(s)
    res["stats"], res["outlier_heads"] = stats.to_dict(), outlier_heads(stats, top=10)
    sections.report_statistics(s, stats, res["outlier_heads"], rep)

    sections.report_weight_histograms(s, sens["layers"], rep)

    recs = sections.oscillation_records(opts.metrics) if opts.metrics else []
    if recs:
        res["oscillation"] = sections.oscillation_summary(recs)
    sections.report_oscillation(opts.metrics, recs, rep)

    if opts.compare is not None:
        res["compare"], ostats = sections.comparison(s, logits, *opts.compare)
        sections.report_comparison(s, res, stats, ostats, rep)

    if opts.bit_budget is not None:
        res["mixed_precision"] = mp = sections.mixed_precision(s, sens["layers"], opts.bit_budget, opts.choices)
        mp["file"] = str(sections.write_mixed_precision(mp, out / "mixed_precision.yaml", s.name, opts.choices))
        sections.report_mixed_precision(mp, opts.choices, rep)

    res["wall_s"] = time.time() - t0
    write_report(out, res, rep)
    return res


def write_report(out: Path, res: dict[str, Any], rep: Report) -> None:
    """``analysis.json`` (every number), ``report.md`` (the PNGs linked) and ``report.html`` (embedded)."""
    (out / "analysis.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (out / "report.md").write_text(rep.markdown())
    (out / "report.html").write_text(rep.html(f"vvtq variation report: {res['checkpoint']}"))


# ------------------------------------------------------------------------------------------------ CLI
def run_analyze(args: argparse.Namespace) -> dict[str, Any]:
    """The ``vvtq analyze`` command (see ``vvtq analyze --help``)."""
    from ..device import resolve_device
    from ..modelio import load_model

    device = resolve_device(args.device)
    model, meta = load_model(args.checkpoint, device)
    src = data_source(meta).given(args.data, args.data_root)
    if not src.data:
        raise ConfigError(f"{args.checkpoint} records no dataset; pass --data")
    img, mean, std = meta["img_size"], meta["mean"], meta["std"]
    calib = load_batches(src.data, "train", src.root, args.calib_images, img, mean, std, shuffle_seed=0)
    evalb = load_batches(src.data, src.val_split, src.root, args.eval_images, img, mean, std, batch_size=250,
                         holdout=src.holdout)
    compare = None
    if args.compare:
        other, ometa = load_model(args.compare, device)
        if ometa["img_size"] != img:
            raise ConfigError(f"--compare {args.compare} takes {ometa['img_size']} px images, this one {img}")
        compare = (other, ometa, Path(args.compare).as_posix())
    choices = tuple(getattr(args, "bit_choices", None) or DEFAULT_CHOICES)
    res = analyze(model, meta, calib, evalb, args.out, AnalyzeOptions(
        bits=args.bits, device=device, metrics=args.metrics, compare=compare, bit_budget=args.bit_budget,
        choices=choices, name=Path(args.checkpoint).as_posix()))
    print(f"wrote {Path(args.out) / 'report.md'} and report.html ({res['wall_s']:.0f} s)")
    if "mixed_precision" in res:
        mp = res["mixed_precision"]
        print(f"wrote {mp['file']}: average {mp['average_bits']:.3f} weight bits (budget {mp['budget']:g})")
    return res
