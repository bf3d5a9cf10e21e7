"""LSQ fake quantization with a learned step size (Esser et al., *Learned Step Size Quantization*, ICLR 2020).

For a tensor x, step size s > 0, optional offset beta and integer range [Qn, Qp]:

    v      = (x - beta) / s
    x_int  = clamp(round(v), Qn, Qp)            (round half to even)
    x_hat  = s * x_int + beta

Gradients (straight-through estimator, LSQ §2):

    d x_hat / d x    = 1 if Qn <= v <= Qp else 0
    d x_hat / d s    = (x_int - v) if Qn <= v <= Qp else x_int          (x_int is Qn or Qp when clipped)
    d x_hat / d beta = 0 if Qn <= v <= Qp else 1

The scale and offset gradients are summed over the elements that share a scale and multiplied by a gradient
scale g (LSQ: g = 1/sqrt(N * Qp)). Values in the half-step band just outside the range (v in (Qp, Qp + 0.5])
count as clipped, as in LSQ and the VVTQ reference code; PyTorch's
``torch._fake_quantize_learnable_per_tensor_affine`` counts them as inside.

One custom autograd function does the forward in a single fused expression and recomputes the cheap
intermediates in backward, so that it saves only its input and the (tiny) scale.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _codes(v: Tensor, qmin: int, qmax: int) -> Tensor:
    return torch.clamp(torch.round(v), qmin, qmax)


class _LSQFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, offset: Tensor | None, qmin: int, qmax: int, grad_scale: float):
        xf = x.float()
        if offset is not None:
            xf = xf - offset
        q = _codes(xf / scale, qmin, qmax)
        out = q * scale
        if offset is not None:
            out = out + offset
        ctx.save_for_backward(x, scale, offset)
        ctx.qrange = (qmin, qmax)
        ctx.grad_scale = grad_scale
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, scale, offset = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        g = grad_out.float()
        xf = x.float()
        if offset is not None:
            xf = xf - offset
        v = xf / scale
        inside = (v >= qmin) & (v <= qmax)
        grad_x = torch.where(inside, g, 0.0).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_s = grad_b = None
        if ctx.needs_input_grad[1]:
            q = _codes(v, qmin, qmax)
            ds = torch.where(inside, q - v, q)
            grad_s = (g * ds).sum_to_size(scale.shape) * ctx.grad_scale
        if offset is not None and ctx.needs_input_grad[2]:
            grad_b = torch.where(inside, 0.0, g).sum_to_size(offset.shape) * ctx.grad_scale
        return grad_x, grad_s, grad_b, None, None, None


def lsq_fake_quant(
    x: Tensor,
    scale: Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
    offset: Tensor | None = None,
) -> Tensor:
    """Fake-quantize ``x`` with step ``scale`` (broadcastable to ``x``) to the integer range [qmin, qmax].

    Returns ``scale * clamp(round((x - offset) / scale), qmin, qmax) + offset`` in ``x``'s dtype, with the LSQ
    gradients described in this module's docstring; ``grad_scale`` multiplies the scale and offset gradients.
    """
    return _LSQFakeQuant.apply(x, scale, offset, qmin, qmax, grad_scale)


def quant_codes(x: Tensor, scale: Tensor, qmin: int, qmax: int, offset: Tensor | None = None) -> Tensor:
    """The integer codes ``clamp(round((x - offset) / scale), qmin, qmax)`` as int32, without gradient."""
    with torch.no_grad():
        xf = x.float()
        if offset is not None:
            xf = xf - offset
        return _codes(xf / scale, qmin, qmax).to(torch.int32)


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range [Qn, Qp]: signed ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b - 1]``."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1
