"""Distribution statistics of weights and activations, per quantized module and per attention head.

The "static distribution" part of the variation analysis (docs/METHOD.md §1; VVTQ, Huang et al. 2023, §3.1):
for every quantizer site (a weight, or the activation a quantizer sees) and for each attention head,

    std          sigma = sqrt(E[(x - mu)^2])
    kurtosis     E[(x - mu)^4] / sigma^4                  (3 for a Gaussian, larger = heavier tails)
    outlier      max |x - mu| / sigma
    clip_frac    fraction of values with (x - beta)/s outside [Qn, Qp]  (the LSQ clipping region, §2)

Activations are gathered with forward pre-hooks on the quantizer modules over a few calibration batches and
*streamed*: every batch is reduced at once to its count, mean and central sums ``M2, M3, M4`` (float64) per
group, merged into the running totals with the pairwise update of Chan et al. / Pébay (2008). This gives the
same moments as running sums of x, x^2, x^3, x^4 without their cancellation; the running min and max give
the outlier ratio exactly. No activation is stored.

Clipping uses the quantizer's own (learned or calibrated) scales when the site is quantized and initialised.
For a site that is off (an FP model converted at 32 bits), it uses a reference scale: an MSE fit at
``ref_bits`` (edge sites at 8 bits) on the weight, or, for an activation, on the first calibration batch (then
applied to all batches). With ``ref_bits=None`` such sites report no clipping (NaN).
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..quant import QuantAttention, QuantConfig, Quantizer, int_range, mse_fit_scale, quantize_model
from ..quant.config import EDGE_KINDS

__all__ = ["HEAD_KINDS", "ModelStats", "SiteStats", "StreamingMoments", "as_analysis_model",
           "collect_statistics", "layer_of", "outlier_heads", "site_module"]

# kinds whose tensors split into attention heads, and how (see ``head_rows``)
HEAD_KINDS = ("q", "k", "v", "qkv", "proj", "q_act", "k_act", "v_act", "attn_prob", "attn_out")
_FIT_SAMPLES = 1 << 16  # values per group used for a reference MSE fit of an activation scale
_LAYER_RE = re.compile(r"^(.*?blocks\.\d+)\.")  # timm; Hugging Face Swin (encoder.layers.N.blocks.M)
# Hugging Face ViT / DeiT (hf.vit.layers.N), DINOv2 (hf.dinov2.encoder.layer.N); not Swin's patch merging
_HF_LAYER_RE = re.compile(r"^(hf\..*?\.layers?\.\d+)\.(?!downsample)")


class StreamingMoments:
    """Streaming count, mean, central sums ``M2..M4``, min, max and clip counts for ``groups`` groups.

    ``update(rows)`` takes ``rows`` of shape ``[G, n]`` (one row per group). Batches are merged exactly
    (Pébay 2008, eq. 2.1-3.1), in float64.
    """

    def __init__(self, groups: int = 1):
        z = lambda: torch.zeros(groups, dtype=torch.float64)
        self.groups = groups
        self.n, self.mu, self.m2, self.m3, self.m4 = z(), z(), z(), z(), z()
        self.lo = torch.full((groups,), math.inf, dtype=torch.float64)
        self.hi = torch.full((groups,), -math.inf, dtype=torch.float64)
        self.clipped, self.checked = z(), z()

    @torch.no_grad()
    def update(self, rows: Tensor, clipped: Tensor | None = None) -> None:
        """Add a chunk ``rows`` ([G, n]); ``clipped`` is an optional bool mask of the same shape."""
        r = rows.detach().reshape(self.groups, -1).to(torch.float64)
        if r.shape[1] == 0:
            return
        nb = torch.full((self.groups,), float(r.shape[1]), dtype=torch.float64)
        mb = r.mean(dim=1)
        d = r - mb[:, None]
        d2 = d * d
        self._merge(nb, mb.cpu(), d2.sum(1).cpu(), (d2 * d).sum(1).cpu(), (d2 * d2).sum(1).cpu())
        self.lo = torch.minimum(self.lo, r.amin(dim=1).cpu())
        self.hi = torch.maximum(self.hi, r.amax(dim=1).cpu())
        if clipped is not None:
            c = clipped.reshape(self.groups, -1)
            self.clipped += c.sum(dim=1).cpu().double()
            self.checked += float(c.shape[1])

    def _merge(self, nb: Tensor, mb: Tensor, m2b: Tensor, m3b: Tensor, m4b: Tensor) -> None:
        na, ma, m2a, m3a, m4a = self.n, self.mu, self.m2, self.m3, self.m4
        n = na + nb
        delta = mb - ma
        dn = delta / n
        self.m4 = (m4a + m4b + delta * dn ** 3 * na * nb * (na * na - na * nb + nb * nb)
                   + 6 * dn * dn * (na * na * m2b + nb * nb * m2a) + 4 * dn * (na * m3b - nb * m3a))
        self.m3 = m3a + m3b + delta * dn * dn * na * nb * (na - nb) + 3 * dn * (na * m2b - nb * m2a)
        self.m2 = m2a + m2b + delta * dn * na * nb
        self.mu = ma + dn * nb
        self.n = n

    def merged(self) -> StreamingMoments:
        """All groups pooled into one."""
        out = StreamingMoments(1)
        for g in range(self.groups):
            sl = slice(g, g + 1)
            out._merge(self.n[sl], self.mu[sl], self.m2[sl], self.m3[sl], self.m4[sl])
        out.lo, out.hi = self.lo.min().reshape(1), self.hi.max().reshape(1)
        out.clipped, out.checked = self.clipped.sum().reshape(1), self.checked.sum().reshape(1)
        return out

    # ---------------------------------------------------------------- derived statistics, per group
    @property
    def mean(self) -> Tensor:
        return self.mu.clone()

    @property
    def std(self) -> Tensor:
        return (self.m2 / self.n).sqrt()

    @property
    def kurtosis(self) -> Tensor:
        """``E[(x-mu)^4] / sigma^4 = n M4 / M2^2`` (3 for a Gaussian)."""
        return self.n * self.m4 / (self.m2 * self.m2)

    @property
    def skewness(self) -> Tensor:
        return self.n.sqrt() * self.m3 / self.m2.pow(1.5)

    @property
    def outlier_ratio(self) -> Tensor:
        """``max |x - mu| / sigma``."""
        return torch.maximum(self.hi - self.mu, self.mu - self.lo) / self.std

    @property
    def clip_fraction(self) -> Tensor:
        return torch.where(self.checked > 0, self.clipped / self.checked.clamp_min(1), math.nan)

    def summary(self, g: int = 0) -> dict[str, float]:
        return {"n": int(self.n[g]), "mean": float(self.mu[g]), "std": float(self.std[g]),
                "kurtosis": float(self.kurtosis[g]), "skewness": float(self.skewness[g]),
                "outlier": float(self.outlier_ratio[g]),
                "max_abs": float(max(abs(self.lo[g]), abs(self.hi[g]))),
                "clip_frac": float(self.clip_fraction[g])}


# ------------------------------------------------------------------------------------------------ sites
def site_module(name: str) -> str:
    """The module a quantizer belongs to: ``blocks.3.attn.q.weight_quant -> blocks.3.attn.q``,
    ``blocks.3.attn.q_quant -> blocks.3.attn.q_quant`` (activation sites keep their own name)."""
    return name[: -len(".weight_quant")] if name.endswith(".weight_quant") else name


def layer_of(name: str) -> str:
    """The transformer block of a site (``blocks.3``, ``layers.1.blocks.0``, ``hf.vit.layers.3``), or ``""``
    for the edges (patch embedding, patch merging, head)."""
    m = _LAYER_RE.match(name) or _HF_LAYER_RE.match(name)
    return m.group(1) if m else ""


def head_rows(x: Tensor, kind: str, heads: int, is_weight: bool) -> Tensor:
    """``x`` as ``[H, n]``, one row per attention head.

    Weights: q/k/v rows of a head ([H*d, C] -> rows of block h); fused qkv the q, k and v rows of head h;
    proj the input columns of head h. Activations: q/k/v/softmax ``[B, H, N, *]`` by axis 1; attn@v
    ``[B, N, H*d]`` by blocks of the last axis."""
    if is_weight:
        if kind == "proj":
            return x.reshape(x.shape[0], heads, -1).transpose(0, 1).reshape(heads, -1)
        if kind == "qkv":
            return x.reshape(3, heads, -1).transpose(0, 1).reshape(heads, -1)
        return x.reshape(heads, -1)
    if kind == "attn_out":
        return x.reshape(-1, heads, x.shape[-1] // heads).transpose(0, 1).reshape(heads, -1)
    return x.transpose(0, 1).reshape(heads, -1)


def _group_rows(x: Tensor, axis: int, groups: int) -> Tensor:
    if groups == 1:
        return x.reshape(1, -1)
    return x.movedim(axis % x.ndim, 0).reshape(groups, -1)


def _expand(p: Tensor, x: Tensor, axis: int, groups: int) -> Tensor:
    if groups == 1:
        return p.reshape(())
    ax = axis % x.ndim
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    return p.repeat_interleave(x.shape[ax] // groups).view(shape)


@dataclass
class SiteStats:
    """Statistics of one quantizer site; ``moments`` has one group per head (``heads``) or one group."""

    name: str
    kind: str
    is_weight: bool
    bits: int
    heads: int
    moments: StreamingMoments
    scale_source: str = "none"  # "learned", "mse@<b>" or "none"
    _total: StreamingMoments | None = field(default=None, repr=False)

    @property
    def module(self) -> str:
        return site_module(self.name)

    @property
    def layer(self) -> str:
        return layer_of(self.name)

    @property
    def total(self) -> StreamingMoments:
        if self._total is None or self._total.n.sum() != self.moments.n.sum():
            self._total = self.moments.merged() if self.moments.groups > 1 else self.moments
        return self._total

    def row(self, head: int | None = None) -> dict[str, Any]:
        base = {"site": self.name, "module": self.module, "layer": self.layer, "kind": self.kind,
                "tensor": "weight" if self.is_weight else "act", "bits": self.bits, "head": head,
                "scale": self.scale_source}
        stats = self.total.summary() if head is None else self.moments.summary(head)
        return {**base, **stats}


class ModelStats:
    """Per-site statistics of a model; ``rows()`` gives flat records, ``matrix()`` heat-map tables."""

    def __init__(self, sites: dict[str, SiteStats]):
        self.sites = sites

    def rows(self, per_head: bool = False) -> list[dict[str, Any]]:
        """One record per site (``per_head=False``) or per site and head (sites with heads only)."""
        out = []
        for s in self.sites.values():
            if not per_head:
                out.append(s.row())
            elif s.heads > 1:
                out.extend(s.row(h) for h in range(s.heads))
        return out

    def matrix(self, metric: str, tensor: str = "weight") -> tuple[list[str], list[str], list[list[float]]]:
        """``(layers, kinds, M)`` with ``M[i][j]`` = ``metric`` of kind j in block i (NaN where absent)."""
        sel = [s for s in self.sites.values() if s.layer and (s.is_weight == (tensor == "weight"))]
        layers = list(dict.fromkeys(s.layer for s in sel))
        kinds = list(dict.fromkeys(s.kind for s in sel))
        m = [[math.nan] * len(kinds) for _ in layers]
        for s in sel:
            m[layers.index(s.layer)][kinds.index(s.kind)] = s.row()[metric]
        return layers, kinds, m

    def head_matrix(self, metric: str, kind: str) -> tuple[list[str], list[list[float]]]:
        """``(layers, M)`` with ``M[i][h]`` = ``metric`` of head h of site ``kind`` in block i (rows padded
        with NaN where blocks have fewer heads, as in Swin)."""
        sel = [s for s in self.sites.values() if s.kind == kind and s.heads > 1 and s.layer]
        width = max((s.heads for s in sel), default=0)
        rows = [[s.row(h)[metric] for h in range(s.heads)] + [math.nan] * (width - s.heads) for s in sel]
        return [s.layer for s in sel], rows

    def head_kinds(self) -> list[str]:
        return list(dict.fromkeys(s.kind for s in self.sites.values() if s.heads > 1))

    def to_dict(self) -> dict[str, Any]:
        return {"sites": self.rows(), "heads": self.rows(per_head=True)}


def outlier_heads(stats: ModelStats, top: int = 10) -> list[dict[str, Any]]:
    """Heads that stand out from the other heads of their site, by
    ``score = max(std_h / median_h' std_h', kurtosis_h / median_h' kurtosis_h')``, largest first."""
    out = []
    for s in stats.sites.values():
        if s.heads < 2:
            continue
        std, kurt = s.moments.std, s.moments.kurtosis
        med_std, med_kurt = std.median(), kurt.median()
        for h in range(s.heads):
            r_std, r_kurt = float(std[h] / med_std), float(kurt[h] / med_kurt)
            out.append({**s.row(h), "std_ratio": r_std, "kurt_ratio": r_kurt, "score": max(r_std, r_kurt)})
    out = [r for r in out if math.isfinite(r["score"])]
    return sorted(out, key=lambda r: -r["score"])[:top]


# ------------------------------------------------------------------------------------------------ collection
def as_analysis_model(model: nn.Module) -> nn.Module:
    """``model`` itself if converted by ``quantize_model``; else a copy converted at 32 bits (the vvtq
    preset), so that every site exists, named and typed, while the model computes exactly in FP."""
    if getattr(model, "vvtq_config", None) is not None:
        return model
    cfg = QuantConfig.preset("vvtq", wbits=32, abits=32, edge_bits=32)
    return quantize_model(copy.deepcopy(model), cfg)


def _heads_of(model: nn.Module) -> dict[str, int]:
    return {name: m.num_heads for name, m in model.named_modules() if isinstance(m, QuantAttention)}


def _site_heads(name: str, kind: str, attn_heads: dict[str, int]) -> int:
    if kind not in HEAD_KINDS:
        return 1
    owner = max((a for a in attn_heads if name.startswith(a + ".")), key=len, default=None)
    return attn_heads[owner] if owner is not None else 1


def _live(q: Quantizer) -> bool:
    return q.enabled and bool(q.initialized)


class _Probe(nn.Module):
    """Stands in for a switched-off softmax quantizer, so that the attention computes the softmax explicitly
    (identical maths in eval mode) and the hook sees the attention probabilities."""

    def __init__(self, inner: Quantizer):
        super().__init__()
        self.inner = inner

    @property
    def enabled(self) -> bool:
        return True

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


class _ActCollector:
    def __init__(self, q: Quantizer, site: SiteStats, ref_bits: int | None):
        self.q, self.site, self.ref_bits = q, site, ref_bits
        self.ref_scale: Tensor | None = None
        self.ref_offset: Tensor | None = None
        self.qrange: tuple[int, int] | None = None
        if _live(q):
            site.scale_source = "learned"
        elif ref_bits is not None:
            site.scale_source = f"mse@{8 if q.kind in EDGE_KINDS else ref_bits}"

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        site = self.site
        clipped = self._clipped(x)
        if site.heads > 1:
            rows = head_rows(x, site.kind, site.heads, False)
            cl = None if clipped is None else head_rows(clipped, site.kind, site.heads, False)
        else:
            rows, cl = x.reshape(1, -1), None if clipped is None else clipped.reshape(1, -1)
        site.moments.update(rows, cl)

    def _clipped(self, x: Tensor) -> Tensor | None:
        q = self.q
        if _live(q):
            v = x.float()
            off = q.expanded_offset(x)
            if off is not None:
                v = v - off
            v = v / q.expanded_scale(x)
            return (v < q.qmin) | (v > q.qmax)
        if self.ref_bits is None:
            return None
        if self.ref_scale is None:  # fit on the first batch
            bits = 8 if q.kind in EDGE_KINDS else self.ref_bits
            self.qrange = int_range(bits, q.signed)
            rows = _group_rows(x.float(), q.axis, q.num_groups)
            if rows.shape[1] > _FIT_SAMPLES:
                idx = torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(0))[:_FIT_SAMPLES]
                rows = rows[:, idx.to(rows.device)]
            if q.offset is not None:
                self.ref_offset = rows.amin(dim=1).clamp(max=0.0)
                rows = rows - self.ref_offset[:, None]
            self.ref_scale = mse_fit_scale(rows, *self.qrange).to(x.device)
        v = x.float()
        if self.ref_offset is not None:
            v = v - _expand(self.ref_offset, x, q.axis, q.num_groups)
        v = v / _expand(self.ref_scale, x, q.axis, q.num_groups)
        return (v < self.qrange[0]) | (v > self.qrange[1])


@torch.no_grad()
def _weight_site(layer: nn.Module, q: Quantizer, heads: int, ref_bits: int | None) -> SiteStats:
    w = layer.weight.detach()
    site = SiteStats(q.name, q.kind, True, q.bits, heads, StreamingMoments(heads))
    clipped = None
    if _live(q):
        v = w.float() / q.expanded_scale(w)
        clipped = (v < q.qmin) | (v > q.qmax)
        site.scale_source = "learned"
    elif ref_bits is not None:
        bits = 8 if q.kind in EDGE_KINDS else ref_bits
        qmin, qmax = int_range(bits, True)
        s = mse_fit_scale(_group_rows(w.float(), q.axis, q.num_groups), qmin, qmax)
        v = w.float() / _expand(s, w, q.axis, q.num_groups)
        clipped = (v < qmin) | (v > qmax)
        site.scale_source = f"mse@{bits}"
    if heads > 1:
        site.moments.update(head_rows(w, q.kind, heads, True),
                            None if clipped is None else head_rows(clipped, q.kind, heads, True))
    else:
        site.moments.update(w.reshape(1, -1), None if clipped is None else clipped.reshape(1, -1))
    return site


def _inputs(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def collect_statistics(model: nn.Module, batches: Iterable | None = None, *, ref_bits: int | None = None,
                       max_batches: int | None = None, device: torch.device | str | None = None,
                       weights: bool = True, activations: bool = True) -> ModelStats:
    """Statistics of every quantizer site of ``model`` (converted, or FP: see ``as_analysis_model``).

    ``batches`` yields inputs (or ``(x, y)`` tuples) for the activation statistics (streamed, never stored);
    ``ref_bits`` is the bit-width of the reference MSE scale for clipping at sites that are off.
    Returns a ``ModelStats`` with one ``SiteStats`` per site, in module order (weights, then activations).
    """
    model = as_analysis_model(model)
    attn_heads = _heads_of(model)
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    sites: dict[str, SiteStats] = {}
    if weights:
        for q in quantizers:
            if q.is_weight:
                layer = model.get_submodule(site_module(q.name))
                sites[q.name] = _weight_site(layer, q, _site_heads(q.name, q.kind, attn_heads), ref_bits)
    if not activations or batches is None:
        return ModelStats(sites)
    if device is None:
        device = next(model.parameters()).device
    hooks, swapped = [], []
    try:
        for q in quantizers:
            if q.is_weight:
                continue
            site = SiteStats(q.name, q.kind, False, q.bits, _site_heads(q.name, q.kind, attn_heads),
                             StreamingMoments(_site_heads(q.name, q.kind, attn_heads)))
            sites[q.name] = site
            hooks.append(q.register_forward_pre_hook(_ActCollector(q, site, ref_bits)))
        for m in model.modules():
            if isinstance(m, QuantAttention) and not m.attn_quant.enabled:
                swapped.append((m, m.attn_quant))
                m.attn_quant = _Probe(m.attn_quant)
        was_training = model.training
        model.eval()
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            model(_inputs(batch).to(device))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
        for m, q in swapped:
            m.attn_quant = q
    empty = [n for n, s in sites.items() if not s.is_weight and s.moments.n.sum() == 0]
    for n in empty:  # sites the forward pass never reached (e.g. an unused distillation head)
        del sites[n]
    return ModelStats(sites)
