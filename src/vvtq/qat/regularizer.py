"""Oscillation-aware bin regularizer (Huang et al., *Variation-aware Vision Transformer Quantization*,
arXiv 2307.00331 / TMLR 2024, §"oscillation-aware bin regularization"), with the dampening term of
Nagel et al., *Overcoming Oscillations in Quantization-Aware Training* (ICML 2022).

For one quantized weight tensor ``w`` with step size ``s`` (broadcast per group) and integer range [Qn, Qp]:

    w_c   = clamp(w, s*Qn, s*Qp)
    q     = clamp(round(w / s), Qn, Qp)                       (integer code = bin id)
    w_hat = s * q
    R     = mean((w_c - stopgrad(w_hat))^2) + sum_j Var(w_c | q == j)

The first term (dampening) pulls latent weights onto their levels; the second shrinks the spread of each bin,
so fewer weights sit near a rounding threshold. The training loss adds ``lambda(t) * sum_layers R`` with
``lambda(t)`` from :func:`lambda_schedule`.

Differences from the reference implementation (deliberate, see docs/METHOD.md §7):

* bins come from the integer codes, so every weight belongs to exactly one bin (the reference matched members
  by float equality ``(s*q)/s == q`` and missed 2-5 % of the weights at 3-4 bits);
* all bins are computed in one vectorized pass (``bincount`` / ``index_add``), not a Python loop over bins;
* 8-bit layers are skipped by default in the model-level loss (they are near-lossless, and the reference
  spends most of its regularizer time there).

Two implementations of the one loss: the eager pass with its hand-written backward (the reference; GPU, no
compiler, ``VVTQ_FUSED=0``), and compiled kernels of the same maths over all the layers of one shape at once
(CPU, float32, large layers), which benchmarks/results/regularizer_cost.json shows are needed to keep the
regularizer under 5% of a step. Both follow vvtq.quant.fake_quant's switch (``fused_kernels``).
The QAT lever is ``BinRegularizer``, built from the recipe setting ``regularizer`` (``RegularizerSettings``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .base import Lever, LeverSettings, RunContext, StepOutputs, register_lever

__all__ = ["BinRegularizer", "RegularizerSettings", "bin_regularizer", "bin_regularizer_loss", "lambda_schedule"]

Variance = Literal["unbiased", "population"]
Weighting = Literal["none", "size"]
Bins = Literal["tensor", "group"]
Units = Literal["weight", "step"]


def check_options(variance: str, weighting: str, bins: str, units: str) -> None:
    """Raise ``ValueError`` naming the first option that is not one of its allowed values."""
    for name, value, allowed in (("variance", variance, ("unbiased", "population")),
                                 ("weighting", weighting, ("none", "size")), ("bins", bins, ("tensor", "group")),
                                 ("units", units, ("weight", "step"))):
        if value not in allowed:
            raise ValueError(f"regularizer {name} must be one of {allowed}; got {value!r}")


def bin_regularizer(
    w: Tensor,
    scale: Tensor | float,
    qmin: int,
    qmax: int,
    variance: Variance = "unbiased",
    weighting: Weighting = "none",
    bins: Bins = "tensor",
    offset: Tensor | None = None,
    units: Units = "weight",
) -> Tensor:
    """Bin regularizer ``R = mean((w_c - sg(w_hat))^2) + sum_j c_j * Var_j`` for one weight tensor.

    Args:
        w: latent weights (any shape).
        scale: step size ``s`` > 0, a scalar or a tensor broadcastable to ``w`` (e.g. the quantizer's
            ``expanded_scale(w)``); gradients flow to it through the clipped weights ``w_c`` only (``w_hat``
            is detached, as in the published formula).
        qmin, qmax: the integer code range [Qn, Qp].
        variance: ``"unbiased"`` (default, as published): ``Var_j = SS_j / (n_j - 1)``; ``"population"``:
            ``SS_j / n_j``, where ``SS_j = sum_{i in j} (w_c,i - mean_j)^2``. Bins with 0 or 1 members
            contribute 0 either way.
        weighting: ``"none"`` (default, as published): ``c_j = 1``, bin variances summed; ``"size"``:
            ``c_j = n_j / N``, each bin weighted by its share of the weights (a 2-member bin then no longer
            counts as much as a 10 000-member one).
        bins: ``"tensor"`` (default, as published): one bin per integer code over the whole tensor, even when
            ``scale`` is per channel/head (variances are in real units of ``w_c``); ``"group"``: one bin per
            (scale position, code), i.e. per channel for a per-channel scale (and per row for a head-wise
            scale expanded row by row).
        offset: optional offset ``beta`` broadcastable to ``w``; everything is then computed on ``w - beta``.
        units: ``"weight"`` (default, as published): ``R`` in the units of ``w`` squared, so a layer with small
            steps is barely pulled; ``"step"``: ``R`` computed on ``w / sg(s)`` (in steps), so every weight is
            pulled by the same measure of how far it sits from its level, whatever its layer's step size. No
            gradient then reaches ``s``.

    Returns:
        A scalar tensor (float32, or float64 for float64 input), differentiable w.r.t. ``w`` and ``scale``.

    Variances use a centred two-pass form (bin means gathered back per element, squared deviations
    scatter-added), which is as accurate as a per-bin loop and has the exact gradient.
    """
    if qmax < qmin:
        raise ValueError(f"empty code range [{qmin}, {qmax}]")
    check_options(variance, weighting, bins, units)
    x, s = _prepare(w, scale, offset, units)
    if x.numel() == 0:
        return x.sum() + 0.0 * s.sum()
    if s.dim() <= x.dim() and _use_fused(x, s):  # the compiled kernels take a stack: here, of one
        s = s.reshape((1,) * (x.dim() - s.dim()) + tuple(s.shape))
        return _BinRegularizerFn.apply(x.unsqueeze(0), s.unsqueeze(0), qmin, qmax, variance, weighting, bins, True)
    return _BinRegularizerFn.apply(x, s, qmin, qmax, variance, weighting, bins, False)


def _prepare(w: Tensor, scale: Tensor | float, offset: Tensor | None, units: str) -> tuple[Tensor, Tensor]:
    """The values ``x`` (``w - offset``, in steps for ``units="step"``) and the step ``s`` that R is computed on."""
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    x = w.to(dtype)
    if offset is not None:
        x = x - offset.to(dtype)
    s = torch.as_tensor(scale, device=w.device).to(dtype)
    if units == "step":  # in steps: x / s with s fixed; the groups (for bins="group") keep their shape
        x = x / s.detach()
        s = torch.ones_like(s)
    return x, s


def _binned(d: Tensor, y: Tensor | None, idx: Tensor, nbins: int, bin_n: Tensor | float, variance: str,
            weighting: str, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """``R`` (float64) and ``dR/dw_c`` (flat, ``d``'s dtype; ``d`` is overwritten) from the flat distances ``d``,
    the values ``y`` whose per-bin spread is penalised (``None``: ``y = d``) and the bin of every weight (``idx``,
    int32). ``bin_n`` is the size N of the tensor each bin belongs to (a float, or one per bin)."""
    one = y is None
    y = d if one else y
    counts = torch.bincount(idx, minlength=nbins).double()
    sum_y = torch.bincount(idx, weights=y.double(), minlength=nbins)
    sum_y2 = torch.bincount(idx, weights=(y * y).double(), minlength=nbins)
    mean_y = sum_y / counts.clamp_min(1.0)
    ss = (sum_y2 - sum_y * mean_y).clamp_min(0.0)
    denom = counts - 1.0 if variance == "unbiased" else counts
    coef = torch.where(counts > 1, 1.0 / denom.clamp_min(1.0), torch.zeros_like(counts))
    if weighting == "size":
        coef = coef * counts / bin_n
    pull = (sum_y2 / bin_n).sum() if one else (d * d).sum(dtype=torch.float64) / bin_n
    r = pull + (coef * ss).sum()
    if not want_grad:
        return r, None
    # g = 2 d / N + y * 2 c_j - 2 c_j ybar_j: two per-bin values looked up per weight
    lookup = torch.stack([2.0 * coef + (2.0 / bin_n if one else 0.0), 2.0 * coef * mean_y], 1)
    per = lookup.to(d.dtype).index_select(0, idx)
    if one:
        return r, d.mul_(per[:, 0]).sub_(per[:, 1])
    return r, y.mul_(per[:, 0]).sub_(per[:, 1]).add_(d, alpha=2.0 / bin_n)


class _BinRegularizerFn(torch.autograd.Function):
    """``R`` in one forward pass, with its analytic gradient (no autograd graph over the scatter ops).

    With ``d_i = w_c,i - w_hat_i`` (0 for a clipped weight) and ``j(i)`` the bin of weight i, every bin statistic
    comes from three histograms of the codes (``bincount``: members n_j, sum and sum of squares of y), so nothing
    is gathered back per element in the forward pass: ``SS_j = sum_{i in j} y_i^2 - n_j ybar_j^2`` (summed in
    float64). ``y = d`` where the step is constant within each bin (one step, or bins per group; then |y| <= s/2
    and the form is well conditioned), else ``y = w_c``. Then

        R = sum_i d_i^2 / N + sum_j c_j SS_j
        dR/dw_c,i = 2 d_i / N + 2 c_j(i) (y_i - ybar_j(i))      (d mean_j / d w_c adds nothing)
        dR/dw_i   = dR/dw_c,i inside [s Qn, s Qp], else 0
        dR/ds     = sum over the clipped weights of (Qn or Qp) * dR/dw_c,i   (w_hat is a constant, as published)
    """

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, qmin: int, qmax: int, variance: str, weighting: str, bins: str,
                stacked: bool):
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.fused = None
        if stacked:  # compiled, over a stack of same-shape layers (see bin_regularizer_loss)
            group = bins == "group" and s[0].numel() > 1
            r, *tables = _fused("stats", x.detach(), s.detach(), qmin, qmax, group, variance == "unbiased",
                                weighting == "size")
            if want_grad:
                ctx.save_for_backward(x, s, *tables)
                ctx.fused = (qmin, qmax, group)
            return r
        v = x / s
        code = v.clamp(qmin, qmax)
        inside = code == v
        code.round_()  # round(clamp(v)) = clamp(round(v)): the bounds are integers
        d = v.sub_(code).mul_(s).mul_(inside)  # x - s * code inside the range, 0 where clipped
        nbins = qmax - qmin + 1
        idx = code.to(torch.int32).sub_(qmin)
        one_step = s.numel() == 1
        if bins == "group" and not one_step:
            group = torch.arange(s.numel(), device=x.device, dtype=torch.int32).reshape(s.shape)
            idx = idx.add_(group * nbins)  # s broadcasts to x: in place
            nbins = nbins * s.numel()
            one_step = True
        idx, flat = idx.reshape(-1), d.reshape(-1)
        y = flat if one_step else torch.addcmul(flat, s.expand_as(x).reshape(-1), code.reshape(-1))  # w_c
        n = flat.numel()
        r, g = _binned(flat, None if one_step else y, idx, nbins, float(n), variance, weighting, want_grad)
        r = r.to(x.dtype)
        if g is not None:
            g = g.view(x.shape)
            ctx.save_for_backward(g, code, inside)
            ctx.s_shape = s.shape
        return r

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.fused is not None:
            x, s, ta, tb = ctx.saved_tensors
            qmin, qmax, group = ctx.fused
            gx, gs = _fused("grad", x.detach(), s.detach(), grad.detach(), ta, tb, qmin, qmax, group)
            return (gx if ctx.needs_input_grad[0] else None), (gs if ctx.needs_input_grad[1] else None), \
                None, None, None, None, None, None
        g, code, inside = ctx.saved_tensors
        g = g * grad
        gx = g * inside if ctx.needs_input_grad[0] else None
        gs = (g * code).masked_fill_(inside, 0.0).sum_to_size(ctx.s_shape) if ctx.needs_input_grad[1] else None
        return gx, gs, None, None, None, None, None, None


# ------------------------------------------------------------------ compiled kernels (torch.compile, CPU)
# The same maths in one compiled pass over the weights each way, for float32 CPU tensors of at least
# FUSED_MIN_NUMEL elements (the eager chain above is ~20 passes plus three histograms). With few codes (4, 8 or
# 16), every bin statistic is a masked sum, so the forward pass is one loop with 3 x (Qp - Qn + 1) accumulators
# (float32 sums, exact for the counts; the per-bin totals are combined in float64) and no bin index is stored;
# the backward pass recomputes the codes from ``x`` and selects each weight's two per-bin coefficients. Follows
# vvtq.quant.fake_quant's switch (``set_fused_kernels`` / VVTQ_FUSED).
# ``x`` and ``s`` hold one or several layers of one shape along dim 0 (see bin_regularizer_loss), each with its
# own bins and N, so a model's layers cost one call per shape.
# Why two implementations of one loss (the eager bincount pass above, the reference and the only one on GPU or
# without a compiler; these kernels): benchmarks/results/regularizer_cost.json measures the eager pass alone at
# 6.9-7.4% of a DeiT-Tiny step (2026-12-07), over the 5% target, and these kernels at 1.5-2.8%.
FUSED_MIN_NUMEL = 1 << 14
_compiled: dict[str, Any] = {}


def _one_step(s: Tensor, group: bool) -> bool:
    """Whether the step is constant within each bin (then ``y = d``)."""
    return group or s[0].numel() == 1


def _elementwise(x: Tensor, s: Tensor, qmin: int, qmax: int, group: bool):
    """Codes, the in-range mask, distances ``d`` and ``y`` (``d``, or ``w_c`` when the step varies in a bin)."""
    v = x / s
    c = v.clamp(qmin, qmax)
    inside = c == v
    code = c.round()
    d = torch.where(inside, (v - code) * s, 0.0)
    y = d if _one_step(s, group) else d + s * code
    return code, inside, d, y


def _stats_math(x: Tensor, s: Tensor, qmin: int, qmax: int, group: bool, unbiased: bool, size_weighted: bool):
    """``R`` and the per-bin tables ``ta = 2 c_j (+ 2/N)``, ``tb = 2 c_j ybar_j`` of a stack of layers ``x``
    ``[layers, ...]``, shaped ``[bins, *group]`` (``[bins, layers, 1, ...]`` with bins per tensor)."""
    code, inside, d, y = _elementwise(x, s, qmin, qmax, group)

    def total(t: Tensor) -> Tensor:  # float32 sums inside the pass (exact counts), float64 across bins
        if group:
            return t.sum_to_size(s.shape).double()
        return t.sum(dim=tuple(range(1, t.dim())), keepdim=True).double()

    masks = [code == j for j in range(qmin, qmax + 1)]
    counts = torch.stack([total(m.float()) for m in masks])
    sum_y = torch.stack([total(torch.where(m, y, 0.0)) for m in masks])
    sum_y2 = torch.stack([total(torch.where(m, y * y, 0.0)) for m in masks])
    n = x[0].numel()
    mean_y = sum_y / counts.clamp_min(1.0)
    ss = (sum_y2 - sum_y * mean_y).clamp_min(0.0)
    denom = counts - 1.0 if unbiased else counts
    coef = torch.where(counts > 1, 1.0 / denom.clamp_min(1.0), 0.0)
    if size_weighted:
        coef = coef * counts / n
    one = _one_step(s, group)
    pull = sum_y2.sum() if one else (d * d).sum().double()
    r = pull / n + (coef * ss).sum()
    ta = 2.0 * coef + (2.0 / n if one else 0.0)
    return r.to(x.dtype), ta.to(x.dtype), (2.0 * coef * mean_y).to(x.dtype)


def _grad_math(x: Tensor, s: Tensor, grad: Tensor, ta: Tensor, tb: Tensor, qmin: int, qmax: int, group: bool):
    """``dR/dx`` and ``dR/ds``: ``g = y ta_j - tb_j (+ 2 d / N when y = w_c)`` for the bin j of each weight."""
    code, inside, d, y = _elementwise(x, s, qmin, qmax, group)
    a = torch.zeros_like(x)
    b = torch.zeros_like(x)
    for k, j in enumerate(range(qmin, qmax + 1)):
        m = code == j
        a = torch.where(m, ta[k], a)
        b = torch.where(m, tb[k], b)
    g = y * a - b
    if not _one_step(s, group):
        g = g + d * (2.0 / x[0].numel())
    g = g * grad
    return torch.where(inside, g, 0.0), torch.where(inside, 0.0, g * code).sum_to_size(s.shape)


def _fused(name: str, *args):
    """The compiled ``_stats_math`` / ``_grad_math``; if compiling fails, fused kernels are switched off for the
    process (as in vvtq.quant.fake_quant, with one warning) and the same function runs eagerly."""
    from vvtq.quant import fake_quant

    eager = _stats_math if name == "stats" else _grad_math
    if fake_quant.fused_kernels_mode() != "0":
        try:
            fn = _compiled.get(name)
            if fn is None:
                fn = _compiled[name] = torch.compile(eager, dynamic=True, fullgraph=True)
            with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=1024):
                return fn(*args)
        except Exception as err:  # no compiler, unsupported platform, ...: stay correct, just slower
            fake_quant.fused_kernels_failed(err, "regularizer")
    return eager(*args)


def _use_fused(x: Tensor, s: Tensor) -> bool:
    from vvtq.quant import fake_quant  # lazy: keeps this module importable on its own

    mode = fake_quant.fused_kernels_mode()
    if mode == "0" or x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    return mode == "1" or x.numel() >= FUSED_MIN_NUMEL


Pairs = Iterable[tuple[nn.Module, Any]]


def _weight_pairs(model_or_pairs: nn.Module | Pairs) -> Pairs:
    if isinstance(model_or_pairs, nn.Module):
        from vvtq.quant import iter_weight_quantizers  # lazy: keeps this module importable on its own

        return iter_weight_quantizers(model_or_pairs)
    return model_or_pairs


def bin_regularizer_loss(
    model_or_pairs: nn.Module | Pairs,
    variance: Variance = "unbiased",
    weighting: Weighting = "none",
    bins: Bins = "tensor",
    skip_bits_ge: int | None = 8,
    units: Units = "weight",
) -> Tensor:
    """``sum_layers R`` (see :func:`bin_regularizer`) over the model's quantized weights.

    ``model_or_pairs`` is a converted model (its quantizers are found with
    ``vvtq.quant.iter_weight_quantizers``) or an iterable of ``(module, quantizer)`` pairs; the latent weight
    is ``module.weight``. Disabled quantizers are skipped, and so are those with ``bits >= skip_bits_ge``
    (default 8: the 8-bit ends, patch embedding and head, are near-lossless and dominate the regularizer's
    cost in the reference); ``skip_bits_ge=None`` keeps every layer. Returns a scalar (0 if none qualifies).
    """
    check_options(variance, weighting, bins, units)
    terms: list[Tensor] = []
    same_shape: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
    for module, q in _weight_pairs(model_or_pairs):
        if not getattr(q, "enabled", True):
            continue
        if skip_bits_ge is not None and getattr(q, "bits", 0) >= skip_bits_ge:
            continue
        w = module.weight
        off_fn = getattr(q, "expanded_offset", None)
        offset = off_fn(w) if off_fn is not None else None
        scale = q.expanded_scale(w)
        x, s = _prepare(w, scale, offset, units)
        if q.qmax >= q.qmin and x.numel() > 0 and s.dim() <= x.dim() and _use_fused(x, s):
            s = s.reshape((1,) * (x.dim() - s.dim()) + tuple(s.shape))
            key = (tuple(x.shape), tuple(s.shape), x.dtype, x.device, int(q.qmin), int(q.qmax))
            same_shape.setdefault(key, []).append((x, s))
            continue
        if q.qmax < q.qmin:
            raise ValueError(f"empty code range [{q.qmin}, {q.qmax}]")
        terms.append(x.sum() + 0.0 * s.sum() if x.numel() == 0 else  # x, s prepared once (as bin_regularizer)
                     _BinRegularizerFn.apply(x, s, q.qmin, q.qmax, variance, weighting, bins, False))
    for (*_, qmin, qmax), layers in same_shape.items():  # one fused call for all the layers of one shape
        xs, ss = zip(*layers, strict=True)
        terms.append(_BinRegularizerFn.apply(torch.stack(xs), torch.stack(ss), qmin, qmax, variance, weighting,
                                             bins, True))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum() if len(terms) > 1 else terms[0]


def lambda_schedule(step: int, total_steps: int, lambda_max: float = 0.01, start_frac: float = 0.25) -> float:
    """Regularizer weight at iteration ``step`` (0-based) of ``total_steps``.

    ``lambda = 0`` for ``step < start = start_frac * total_steps``; then a cosine rise
    ``lambda = lambda_max * (1 - cos(pi * p)) / 2`` with ``p = (step - start) / (total_steps - start)``,
    clamped to [0, 1], so lambda reaches ``lambda_max`` at ``step = total_steps``.
    """
    if total_steps <= 0:
        return 0.0
    start = start_frac * total_steps
    if step < start:
        return 0.0
    span = total_steps - start
    p = 1.0 if span <= 0 else min(max((step - start) / span, 0.0), 1.0)
    return lambda_max * (1.0 - math.cos(math.pi * p)) / 2.0


@dataclass
class RegularizerSettings(LeverSettings):
    """Recipe setting ``regularizer``: ``lambda(t) * sum_layers R`` (see :func:`bin_regularizer` for the options,
    :func:`lambda_schedule` for ``lambda_max`` and ``start_frac``); ``skip_bits_ge`` skips layers of that many
    bits or more (the 8-bit ends)."""

    order = 10  # a loss term only

    lambda_max: float = 0.01
    start_frac: float = 0.25
    variance: str = "unbiased"
    weighting: str = "none"
    bins: str = "tensor"
    skip_bits_ge: int | None = 8
    units: str = "weight"

    def validate(self) -> None:
        check_options(self.variance, self.weighting, self.bins, self.units)
        if self.lambda_max < 0 or not 0.0 <= self.start_frac <= 1.0:
            raise ValueError(f"regularizer needs lambda_max >= 0 and start_frac in [0, 1]; got {self.lambda_max}, "
                             f"{self.start_frac}")

    def build(self, ctx: RunContext) -> BinRegularizer:
        return BinRegularizer(ctx.model, ctx.total_steps, settings=self)


class BinRegularizer(Lever):
    """The scheduled term ``lambda(step) * sum_layers R`` added to every step's loss.

    ``BinRegularizer(model, total_steps, lambda_max=0.01)`` in a loop of your own: ``loss = task + reg(step)``.
    While ``lambda(step) == 0`` it adds a zero without computing R. ``model`` may also be a list of
    ``(module, quantizer)`` pairs; the pairs are collected once, at construction.
    """

    name = "regularizer"

    def __init__(self, model_or_pairs: nn.Module | Pairs, total_steps: int, *args: Any,
                 settings: RegularizerSettings | None = None, **options: Any) -> None:
        # args / options: RegularizerSettings' fields, in its order (lambda_max, start_frac, ...)
        self.settings = settings or RegularizerSettings(*args, **options)
        self.settings.validate()
        self.pairs = list(_weight_pairs(model_or_pairs))
        self.total_steps = total_steps
        self.last_lambda = 0.0
        self.last_value: Tensor | None = None

    def weight(self, step: int) -> float:
        """``lambda(step)``, see :func:`lambda_schedule`."""
        return lambda_schedule(step, self.total_steps, self.settings.lambda_max, self.settings.start_frac)

    def __call__(self, step: int) -> Tensor:
        lam = self.weight(step)
        self.last_lambda = lam
        if lam == 0.0:
            self.last_value = None
            device = self.pairs[0][0].weight.device if self.pairs else None
            return torch.zeros((), device=device)
        st = self.settings
        r = bin_regularizer_loss(self.pairs, st.variance, st.weighting, st.bins, st.skip_bits_ge, st.units)
        self.last_value = r.detach()  # converted in metrics(), so no device sync here
        return lam * r

    def loss(self, step: int, out: StepOutputs) -> Tensor:
        return self(step)

    def metrics(self) -> dict[str, float]:
        """``{"reg/lambda": ..., "reg/R": ...}`` for the logger (R only when it was computed)."""
        out = {"reg/lambda": self.last_lambda}
        if self.last_value is not None:
            out["reg/R"] = float(self.last_value)
        return out


register_lever("regularizer", RegularizerSettings)
