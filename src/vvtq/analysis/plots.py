"""Plots of the variation report, drawn with matplotlib's Agg canvas (no display, no pyplot global state).

Each function writes one small PNG (about 100 dpi, a few inches wide: well under 300 KB) and returns its path.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["DPI", "heatmap", "head_heatmaps", "oscillation_curves", "sensitivity_bars", "weight_histograms"]

DPI = 100


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def sensitivity_bars(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Horizontal bars of top-1 drop (points) and KL to FP per group; ``rows`` have label, drop, kl."""
    labels = [r["label"] for r in rows]
    h = max(2.4, 0.24 * len(labels) + 1.2)
    fig = Figure(figsize=(8, h), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(labels))
    ax1.barh(y, [r["drop"] for r in rows], color="tab:red")
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("top-1 drop (points)")
    ax1.axvline(0, color="k", lw=0.6)
    ax2.barh(y, [r["kl"] for r in rows], color="tab:blue")
    ax2.set_xlabel("KL(FP || quantized)")
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _draw_matrix(fig: Figure, ax, m: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str,
                 log: bool, annotate: bool, colorbar: bool = True) -> None:
    data = np.log10(np.where(m > 0, m, np.nan)) if log else m
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    rotation = 45 if max(map(len, cols), default=0) > 3 else 0
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=rotation)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title, fontsize=8)
    if annotate and m.size <= 120:
        for (i, j), v in np.ndenumerate(m):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6, color="w")
    if colorbar:
        cb = fig.colorbar(im, ax=ax, shrink=0.8)
        cb.ax.tick_params(labelsize=6)
        if log:
            cb.set_label("log10", fontsize=6)


def heatmap(matrix: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], path: str | Path,
            title: str = "", log: bool = False) -> Path:
    """One heat map (rows x columns), annotated with the values when small enough."""
    m = np.asarray(matrix, dtype=float).reshape(len(rows), len(cols))
    size = (max(4.0, 0.7 * len(cols) + 2.2), max(2.5, 0.3 * len(rows) + 1.2))
    fig = Figure(figsize=size, layout="constrained")
    _draw_matrix(fig, fig.subplots(), m, rows, cols, title, log, annotate=True)
    return _save(fig, path)


def head_heatmaps(panels: Sequence[tuple[str, Sequence[str], Sequence[Sequence[float]]]], path: str | Path,
                  title: str = "", log: bool = False) -> Path:
    """A grid of layer x head heat maps, one panel ``(kind, layers, M)`` per module kind; each panel has its
    own colour scale (values annotated, no colour bars)."""
    n = max(len(panels), 1)
    ncol = min(4, n)
    nrow = math.ceil(n / ncol)
    fig = Figure(figsize=(2.2 * ncol + 0.6, 2.1 * nrow + 0.6))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.06, top=0.9, wspace=0.3, hspace=0.45)
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    for ax, (kind, layers, m) in zip(axes, panels, strict=False):
        arr = np.asarray(m, dtype=float)
        _draw_matrix(fig, ax, arr, [lbl.replace("layers.", "L").replace("blocks.", "b") for lbl in layers],
                     [f"h{h}" for h in range(arr.shape[1] if arr.ndim == 2 else 0)], kind, log, annotate=True,
                     colorbar=False)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def weight_histograms(panels: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Histograms of ``w / s`` (each weight divided by its own step size), with the integer levels
    ``Qn..Qp`` (dashed) and the clipping range drawn in. A panel holds ``title``, ``values`` (1-D numpy),
    ``qmin``, ``qmax``."""
    n = max(len(panels), 1)
    fig = Figure(figsize=(4.0 * n, 3.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n)).ravel()
    for ax, p in zip(axes, panels, strict=False):
        v = np.asarray(p["values"], dtype=float)
        lo, hi = min(v.min(initial=0.0), p["qmin"] - 1), max(v.max(initial=0.0), p["qmax"] + 1)
        ax.hist(v, bins=120, range=(lo, hi), color="tab:gray", log=True)
        for level in range(int(p["qmin"]), int(p["qmax"]) + 1):
            ax.axvline(level, color="tab:blue", lw=0.8, ls="--")
        for edge in (p["qmin"], p["qmax"]):
            ax.axvline(edge, color="tab:red", lw=1.2)
        ax.axvspan(lo, p["qmin"], color="tab:red", alpha=0.08)
        ax.axvspan(p["qmax"], hi, color="tab:red", alpha=0.08)
        ax.set_title(p["title"], fontsize=8)
        ax.set_xlabel("w / s  (levels dashed, clipped region shaded)", fontsize=7)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def oscillation_curves(records: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Fraction of oscillating weights against the step: ``osc/overall`` (bold), the mean over layers of each
    module kind (thin), and ``osc/frozen`` if logged. ``records`` are the JSONL step records."""
    recs = [r for r in records if r.get("type") == "step" and "osc/overall" in r]
    steps = [r["step"] for r in recs]
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    by_kind: dict[str, list[str]] = {}
    for key in (recs[-1] if recs else {}):
        if key.startswith("osc/") and key not in ("osc/overall", "osc/frozen"):
            parts = key[4:].split(".")
            kind = parts[-2] if parts[-1] == "weight_quant" and len(parts) >= 2 else parts[-1]
            by_kind.setdefault(kind, []).append(key)
    for kind, keys in by_kind.items():
        ys = [float(np.mean([r.get(k, np.nan) for k in keys])) for r in recs]
        ax.plot(steps, ys, lw=0.9, label=kind)
    ax.plot(steps, [r["osc/overall"] for r in recs], lw=2.2, color="k", label="overall")
    if recs and "osc/frozen" in recs[-1]:
        ax.plot(steps, [r.get("osc/frozen", np.nan) for r in recs], lw=1.5, ls="--", color="tab:red",
                label="frozen")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of weights oscillating")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
