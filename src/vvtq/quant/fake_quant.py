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

One custom autograd function does the forward and recomputes the cheap intermediates in backward, so that it
saves only its input and the (tiny) scale. The element-wise work runs either in eager PyTorch or, for large
tensors on CPU, in kernels fused by ``torch.compile`` (one pass forward, one pass backward), which makes a QAT
step several times cheaper. The fused path is chosen by ``set_fused_kernels`` or the environment variable
``VVTQ_FUSED`` (``auto``: default, fused for CPU tensors of at least ``FUSED_MIN_NUMEL`` elements when a C++
compiler is present; ``1``: fused for every size; ``0``: never). If compiling fails, vvtq warns once and stays
eager for the rest of the process.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

FUSED_MIN_NUMEL = 1 << 18
_FUSED_MODES = ("auto", "1", "0")
_fused_mode = os.environ.get("VVTQ_FUSED", "auto").strip().lower() or "auto"
_fused_broken = False
_compiled: dict[str, object] = {}


def _codes(v: Tensor, qmin: int, qmax: int) -> Tensor:
    return torch.clamp(torch.round(v), qmin, qmax)


# ------------------------------------------------------------------------------------------- the maths
def _forward_math(x: Tensor, scale: Tensor, offset: Tensor | None, qmin: int, qmax: int) -> Tensor:
    xf = x if x.dtype == torch.float32 else x.float()
    v = (xf - offset if offset is not None else xf) / scale
    out = v.round_().clamp_(qmin, qmax).mul_(scale)  # in place on the fresh v: one buffer, 3 passes
    if offset is not None:
        out = out.add_(offset)
    return out


def _backward_math(g: Tensor, x: Tensor, scale: Tensor, offset: Tensor | None, qmin: int, qmax: int):
    """Unscaled gradients ``(dx, ds, dbeta)``; ``ds``/``dbeta`` summed to the shapes of ``scale``/``offset``."""
    g = g if g.dtype == torch.float32 else g.float()
    xf = x if x.dtype == torch.float32 else x.float()
    v = (xf - offset if offset is not None else xf) / scale
    c = v.clamp(qmin, qmax)
    inside = c == v
    grad_x = torch.where(inside, g, 0.0)
    # ds = round(c) - v inside, round(c) (= Qn or Qp) outside
    ds = c.round_().sub_(torch.where(inside, v, 0.0)).mul_(g)
    grad_s = ds.sum_to_size(scale.shape)
    grad_b = None if offset is None else (g - grad_x).sum_to_size(offset.shape)
    return grad_x, grad_s, grad_b


def _fused_fn(name: str):
    fn = _compiled.get(name)
    if fn is None:
        src = _forward_math if name == "forward" else _backward_math
        fn = _compiled[name] = torch.compile(src, dynamic=True, fullgraph=True)
    return fn


def _use_fused(x: Tensor) -> bool:
    if _fused_broken or _fused_mode == "0" or x.device.type != "cpu":
        return False
    if torch.compiler.is_compiling():  # inside a user's torch.compile: let it trace the plain maths
        return False
    return _fused_mode == "1" or x.numel() >= FUSED_MIN_NUMEL


def _run(name: str, x: Tensor, *args):
    eager = _forward_math if name == "forward" else _backward_math
    if _use_fused(x):
        # plain tensors (no Parameter, no requires_grad): fewer guards, so a model needs only a few graphs
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        try:
            with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=1024):
                return _fused_fn(name)(*args)
        except Exception as err:  # no compiler, unsupported platform, ...: stay correct, just slower
            fused_kernels_failed(err, "fake-quant")
    return eager(*args)


def fused_kernels_failed(err: Exception, what: str) -> None:
    """Compiling a fused kernel failed: switch fused kernels off for the process (fake-quant and regularizer
    alike), with one warning naming ``what`` failed; the eager maths runs from here on."""
    global _fused_broken
    _fused_broken = True
    warnings.warn(f"vvtq: fused (torch.compile) {what} kernels unavailable, using eager PyTorch: "
                  f"{type(err).__name__}: {str(err)[:200]}", RuntimeWarning, stacklevel=4)


def set_fused_kernels(mode: bool | str | None = "auto") -> None:
    """Choose the fake-quant kernels: ``True``/``"1"`` fused (torch.compile) for every tensor, ``False``/``"0"``
    eager only, ``"auto"``/``None`` fused for CPU tensors of at least ``FUSED_MIN_NUMEL`` elements."""
    global _fused_mode, _fused_broken
    mode = "auto" if mode is None else {True: "1", False: "0"}.get(mode, mode) if isinstance(mode, bool) else mode
    if mode not in _FUSED_MODES:
        raise ValueError(f"fused-kernel mode must be one of {_FUSED_MODES} or a bool; got {mode!r}")
    _fused_mode = mode
    if mode != "0":
        _fused_broken = False


@contextlib.contextmanager
def fused_kernels(mode: bool | str | None) -> Iterator[None]:
    """``set_fused_kernels(mode)`` for the duration of a block; the mode before it (and whether compiling had
    failed) comes back afterwards, whatever the block did."""
    global _fused_mode, _fused_broken
    before = (_fused_mode, _fused_broken)
    set_fused_kernels(mode)
    try:
        yield
    finally:
        _fused_mode, _fused_broken = before


def fused_kernels_mode() -> str:
    """The current fused-kernel mode (``"auto"``, ``"1"`` or ``"0"``); ``"0"`` once compiling has failed."""
    return "0" if _fused_broken else _fused_mode


def have_cxx_compiler() -> bool:
    """Whether a C++ compiler (needed by the fused CPU kernels) is on the PATH."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++"))


if _fused_mode == "auto" and not have_cxx_compiler():
    _fused_broken = True


class _LSQFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, offset: Tensor | None, qmin: int, qmax: int, grad_scale):
        out = _run("forward", x, x, scale, offset, qmin, qmax)
        ctx.save_for_backward(x, scale, offset)
        ctx.qrange = (qmin, qmax)
        ctx.grad_scale = grad_scale
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, scale, offset = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        grad_x, grad_s, grad_b = _run("backward", x, grad_out, x, scale, offset, qmin, qmax)
        grad_x = grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_s = grad_s * ctx.grad_scale if ctx.needs_input_grad[1] else None
        grad_b = grad_b * ctx.grad_scale if offset is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_s, grad_b, None, None, None


def lsq_fake_quant(
    x: Tensor,
    scale: Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float | Tensor = 1.0,
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
