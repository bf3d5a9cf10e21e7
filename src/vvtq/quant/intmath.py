"""Integer-domain arithmetic of quantized layers, one implementation for two callers: the quantized model's
evaluation (``QuantLinear`` & co. in eval mode without autograd) and the export runtime (``vvtq.export.runtime``).

A quantized tensor is ``x_hat = s[g] * c + beta[g]``: integer codes c, one step size s (and offset beta) per group,
groups along one axis (LSQ, Esser et al. ICLR 2020; LSQ+ offsets, Bhalgat et al. 2020). A layer computes on the
codes and scales afterwards:

    linear:  y_o = s_w,out[o] * ( sum_g s_x[g] s_w,in[g] A[o, g]  +  sum_g beta[g] s_w,in[g] S[o, g] ) + b_o
             A[o, g] = sum_{i in g} c_x[i] c_w[o, i]       S[o, g] = sum_{i in g} c_w[o, i]
    matmul:  a @ b = s_a s_b (C_a @ C_b) + s_a beta_b rowsum(C_a) + beta_a s_b colsum(C_b) + K beta_a beta_b
             (groups = attention heads, off the contraction axes)

Exactness: A, S and C_a @ C_b are sums of integer products. They run in the working dtype when their bound
``K * max|c_a| * max|c_b|`` is below 2^p (p = 24 for float32, 53 for float64): every partial sum is then an exact
integer, whatever the summation order or kernel. Above it (8-bit layers with a long contraction) they run in
float64 and are rounded once to the working dtype. What follows (scales, LayerNorm, softmax, GELU) is ordinary
floating point in a fixed order, so the same inputs give the same bits: a model evaluated through this module and
its packed export run by the runtime give identical logits.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_GROUP_SPLIT = 16  # above this many scale groups along a contraction, multiply the dequantized values instead
_MANTISSA_BITS = {torch.float64: 53, torch.float32: 24}


def expand(p: Tensor, axis: int, groups: int, x: Tensor) -> Tensor:
    """Per-group values ``p`` (G,) broadcastable to ``x``: group g is a contiguous block along ``axis``."""
    if groups == 1:
        return p.reshape(())
    ax = axis % x.ndim
    width = x.shape[ax]
    if width % groups:
        raise ValueError(f"{groups} scale groups do not divide axis {axis} of shape {tuple(x.shape)}")
    shape = [1] * x.ndim
    shape[ax] = width
    return p.repeat_interleave(width // groups).view(shape)


def exact(fn: Callable[..., Tensor], bound: int, *codes: Tensor) -> Tensor:
    """``fn(*codes)`` for a sum of integer products whose partial sums are at most ``bound`` in magnitude: in the
    codes' dtype when that is exact, else in float64, rounded once back."""
    dtype = codes[0].dtype
    if bound < 2 ** _MANTISSA_BITS.get(dtype, 0):
        return fn(*codes)
    return fn(*(c.double() for c in codes)).to(dtype)


class QT:
    """A quantized tensor ``s[g] * codes + beta[g]``: integer-valued float codes, per-group step sizes and offsets
    ``(G,)`` along ``axis``, and ``bound`` = the largest code magnitude."""

    __slots__ = ("codes", "scale", "offset", "axis", "groups", "bound")

    def __init__(self, codes: Tensor, scale: Tensor, offset: Tensor | None, axis: int, groups: int, bound: int):
        self.codes, self.scale, self.offset = codes, scale, offset
        self.axis, self.groups, self.bound = axis % codes.ndim, groups, bound

    def s(self) -> Tensor:
        return expand(self.scale, self.axis, self.groups, self.codes)

    def b(self) -> Tensor | None:
        return None if self.offset is None else expand(self.offset, self.axis, self.groups, self.codes)

    def value(self) -> Tensor:
        """The dequantized tensor ``s * codes + beta`` (what the fake quantizer returns)."""
        out = self.codes * self.s()
        b = self.b()
        return out if b is None else out + b

    def transpose_last(self) -> QT:
        """Swap the last two axes (the groups' axis moves with them)."""
        n = self.codes.ndim
        axis = {n - 1: n - 2, n - 2: n - 1}.get(self.axis, self.axis)
        return QT(self.codes.transpose(-2, -1), self.scale, self.offset, axis, self.groups, self.bound)


def value(x: Tensor | QT) -> Tensor:
    return x.value() if isinstance(x, QT) else x


def quantize(x: Tensor, scale: Tensor, offset: Tensor | None, axis: int, groups: int, qmin: int,
             qmax: int) -> QT:
    """``QT(clamp(round((x - beta) / s), Qn, Qp))`` in ``x``'s dtype (round half to even), as the fake quantizer."""
    scale = scale.to(x.dtype)
    offset = None if offset is None else offset.to(x.dtype)
    v = x if offset is None else x - expand(offset, axis, groups, x)
    codes = torch.div(v, expand(scale, axis, groups, x)).round_().clamp_(qmin, qmax)  # one buffer
    return QT(codes, scale, offset, axis, groups, max(-qmin, qmax))


class QWeight:
    """A quantized weight ``[O, I, ...]``: integer-valued float codes, the step sizes split into an output-side
    factor ``s_out`` (O,) and an input-side one ``s_in`` (G_in,) (per-head scales of the output projection), and
    the largest code magnitude."""

    __slots__ = ("codes", "s_out", "s_in", "bound")

    def __init__(self, codes: Tensor, scale: Tensor, axis: int, groups: int, bound: int):
        out_features = codes.shape[0]
        scale = scale.to(codes.dtype)
        ones = torch.ones(1, dtype=codes.dtype, device=codes.device)
        if groups == 1:
            self.s_out, self.s_in = scale.reshape(1).expand(out_features), ones
        elif axis % codes.ndim == 0:
            self.s_out, self.s_in = scale.repeat_interleave(out_features // groups), ones
        elif axis % codes.ndim == 1:
            self.s_out, self.s_in = ones.expand(out_features), scale
        else:
            raise ValueError(f"weight scale groups must lie along axis 0 or 1; got axis {axis}")
        self.codes, self.bound = codes, bound

    def value(self) -> Tensor:
        """The dequantized weight."""
        w = self.codes * self.s_out.view(-1, *[1] * (self.codes.ndim - 1))
        if self.s_in.numel() > 1:
            s_in = self.s_in.repeat_interleave(self.codes.shape[1] // self.s_in.numel())
            w = w * s_in.view(1, -1, *[1] * (self.codes.ndim - 2))
        return w


def int_linear(x: Tensor | QT, w: Tensor | QWeight, bias: Tensor | None) -> Tensor:
    """``x @ W^T + b`` on codes (the module docstring's formula); float where an operand is not quantized, or where
    the input's groups lie off the contraction axis or are too many (per-channel input scales)."""
    if not isinstance(w, QWeight):
        return F.linear(value(x), w, bias)
    if not isinstance(x, QT) or (x.groups > 1 and x.axis != x.codes.ndim - 1):
        return F.linear(value(x), w.value(), bias)
    K = w.codes.shape[1]
    gx, gw = x.groups, w.s_in.numel()
    G = math.lcm(gx, gw)
    if G > MAX_GROUP_SPLIT:
        return F.linear(x.value(), w.value(), bias)
    k = K // G
    sx, sw = x.scale.repeat_interleave(G // gx), w.s_in.repeat_interleave(G // gw)
    bound = k * x.bound * w.bound
    if G == 1:  # y = A * (s_x s_w,in s_w,out), in place on the fresh accumulator
        y = exact(lambda a, b: a @ b.t(), bound, x.codes, w.codes)
        y = y.mul_(sx * sw * w.s_out) if x.offset is None else y.mul_(sx * sw)
    else:
        acc = exact(lambda a, b: torch.einsum("...gk,ogk->...og", a.unflatten(-1, (G, k)), b.view(-1, G, k)),
                    bound, x.codes, w.codes)
        y = acc.mul_(sx * sw).sum(-1)
    if x.offset is not None:
        colsum = exact(lambda b: b.view(-1, G, k).sum(-1), k * w.bound, w.codes)  # S[o, g]
        y = y.add_(colsum @ (x.offset.repeat_interleave(G // gx) * sw))
    if G > 1 or x.offset is not None:
        y = y.mul_(w.s_out)
    return y if bias is None else y.add_(bias)


def int_conv2d(x: Tensor | QT, w: Tensor | QWeight, bias: Tensor | None, stride, padding, dilation,
               groups: int) -> Tensor:
    """The patch-embedding convolution on codes, per input-channel group g:
    ``y = s_w[o] * (sum_g s_x[g] conv(C_x[g], C_w[:, g]) + sum_g beta[g] S[o, g]) + b``."""

    def conv(a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
        return F.conv2d(a, b, c, stride, padding, dilation, groups)

    if not isinstance(w, QWeight):
        return conv(value(x), w, bias)
    plain = (not isinstance(x, QT) or groups != 1 or w.s_in.numel() > 1 or (x.groups > 1 and x.axis != 1)
             or x.groups > MAX_GROUP_SPLIT or (x.offset is not None and any(p != 0 for p in padding)))
    if plain:
        return conv(value(x), w.value(), bias)
    G = x.groups
    cw = w.codes.shape[1] // G
    bound = cw * math.prod(w.codes.shape[2:]) * x.bound * w.bound
    y = 0.0
    for g in range(G):
        sl = slice(g * cw, (g + 1) * cw)
        y = y + exact(conv, bound, x.codes[:, sl], w.codes[:, sl]) * x.scale[g]
        if x.offset is not None:
            colsum = exact(lambda c: c.sum(dim=(1, 2, 3)), bound // x.bound, w.codes[:, sl])  # S[o, g]
            y = y + (colsum * x.offset[g]).view(1, -1, 1, 1)
    y = y * w.s_out.view(1, -1, 1, 1)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def qmatmul(a: Tensor | QT, b: Tensor | QT) -> Tensor:
    """``a @ b`` for quantized operands whose groups lie off the contraction axes (heads, axis 1):
    ``s_a s_b (C_a @ C_b) + s_a beta_b rowsum(C_a) + beta_a s_b colsum(C_b) + K beta_a beta_b``."""
    if not (isinstance(a, QT) and isinstance(b, QT)):
        return value(a) @ value(b)
    if (a.groups > 1 and a.axis == a.codes.ndim - 1) or (b.groups > 1 and b.axis == b.codes.ndim - 2):
        return a.value() @ b.value()  # groups along the contraction: no common scale to factor out
    K = a.codes.shape[-1]
    sa, sb = a.s(), b.s()
    out = exact(torch.matmul, K * a.bound * b.bound, a.codes, b.codes).mul_(sa * sb)
    ba, bb = a.b(), b.b()
    if bb is not None:
        out = out + sa * exact(lambda c: c.sum(-1, keepdim=True), K * a.bound, a.codes) * bb
    if ba is not None:
        out = out + ba * sb * exact(lambda c: c.sum(-2, keepdim=True), K * b.bound, b.codes)
    if ba is not None and bb is not None:
        out = out + K * ba * bb
    return out


def int_attention(q: Tensor | QT, k: Tensor | QT, v: Tensor | QT, scale: float, bias: Tensor | None,
                  quantize_probs: Callable[[Tensor], Tensor | QT] | None) -> Tensor:
    """``softmax(scale * q @ k^T + bias) @ v`` with quantized q, k, v and (optionally) softmax output, [B, H, N, d]."""
    kt = k.transpose_last() if isinstance(k, QT) else k.transpose(-2, -1)
    logits = qmatmul(q, kt).mul_(scale)
    if bias is not None:
        logits = logits.add_(bias)
    p = logits.softmax(dim=-1)
    return qmatmul(p if quantize_probs is None else quantize_probs(p), v)
