"""LSQ fake quantization vs PyTorch's learnable fake-quant op (an independent oracle), and hand-computed cases."""
from __future__ import annotations

import pytest
import torch

from vvtq.quant import Quantizer, int_range, lsq_fake_quant, quant_codes
from vvtq.quant import fake_quant as fq

BITS = (2, 3, 4, 8)
SCALE = 2.0**-3  # a power of two: x/s == x*(1/s) exactly, as the oracle multiplies by the reciprocal


@pytest.fixture(autouse=True)
def _eager():
    with fq.fused_kernels("0"):
        yield


def _v_values(qmin: int, qmax: int, n: int, seed: int) -> torch.Tensor:
    """Values v = x/s across and beyond [qmin, qmax], with no rounding ties and none in the half-step band."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(4 * n, generator=gen, dtype=torch.float64) * (qmax - qmin + 6) + (qmin - 3)
    frac = v - v.floor()
    keep = ((frac - 0.5).abs() > 1e-3) & ~((v > qmax) & (v <= qmax + 0.5)) & ~((v < qmin) & (v >= qmin - 0.5))
    return v[keep][:n].float()


def _oracle(x, scale, qmin, qmax, g, grad_out):
    xo = x.clone().requires_grad_()
    so = torch.tensor([scale], requires_grad=True)
    y = torch._fake_quantize_learnable_per_tensor_affine(xo, so, torch.tensor([0.0]), qmin, qmax, g)
    y.backward(grad_out)
    return y.detach(), xo.grad, so.grad


def _ours(x, scale, qmin, qmax, g, grad_out, offset=None):
    xo = x.clone().requires_grad_()
    so = torch.tensor(scale, requires_grad=True)
    y = lsq_fake_quant(xo, so, qmin, qmax, g, offset)
    y.backward(grad_out)
    return y.detach(), xo.grad, so.grad


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_per_tensor_matches_pytorch_oracle(bits, signed):
    qmin, qmax = int_range(bits, signed)
    v = _v_values(qmin, qmax, 3000, seed=bits)
    x = v * SCALE
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    g = 0.37
    y0, gx0, gs0 = _oracle(x, SCALE, qmin, qmax, g, grad_out)
    y1, gx1, gs1 = _ours(x, SCALE, qmin, qmax, g, grad_out)
    assert ((v < qmin) | (v > qmax)).any() and ((v >= qmin) & (v <= qmax)).any()  # both regimes covered
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=0)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=0)
    # a float32 sum of 3000 terms: relative to the summands' L1 norm (summation order differs)
    q = v.round().clamp(qmin, qmax)
    ds = torch.where((v >= qmin) & (v <= qmax), q - v, q)
    l1 = g * (grad_out * ds).abs().sum().item()
    assert abs(gs1.item() - gs0.item()) <= 1e-6 * max(abs(gs0.item()), l1)


@pytest.mark.parametrize(("signed", "v", "y_int", "dx", "ds"), [
    (True, 7.3, 7, 0.0, 7.0),      # (Qp, Qp + 0.5]: clipped (PyTorch would say inside: dx=1, ds=7-7.3)
    (True, 7.5, 7, 0.0, 7.0),
    (True, -8.4, -8, 0.0, -8.0),   # [Qn - 0.5, Qn): clipped
    (True, 7.0, 7, 1.0, 0.0),      # the range ends are inside
    (True, -8.0, -8, 1.0, 0.0),
    (True, 3.2, 3, 1.0, 3 - 3.2),
    (True, 9.0, 7, 0.0, 7.0),
    (False, -0.3, 0, 0.0, 0.0),    # unsigned: all of [-0.5, 0) is clipped at Qn = 0
    (False, -0.5, 0, 0.0, 0.0),
    (False, 15.4, 15, 0.0, 15.0),
    (False, 0.0, 0, 1.0, 0.0),
])
def test_half_step_band_is_clipped(signed, v, y_int, dx, ds):
    qmin, qmax = int_range(4, signed)
    s, g = 0.5, 0.25
    y, gx, gs = _ours(torch.tensor([v * s]), s, qmin, qmax, g, torch.ones(1))
    assert y.item() == pytest.approx(y_int * s)
    assert gx.item() == dx
    assert gs.item() == pytest.approx(ds * g, abs=1e-6)


def test_offset_gradient_hand_computed_and_finite_difference():
    qmin, qmax = int_range(3, False)
    s, beta, g = 0.25, -0.4, 0.5
    x = torch.tensor([-1.0, -0.45, -0.3, 0.1, 0.5, 1.3, 1.6, 3.0])
    grad_out = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 1.5, 4.0])
    b = torch.tensor(beta, requires_grad=True)
    xo = x.clone().requires_grad_()
    so = torch.tensor(s, requires_grad=True)
    y = lsq_fake_quant(xo, so, qmin, qmax, g, b)
    y.backward(grad_out)
    v = (x - beta) / s
    q = v.round().clamp(qmin, qmax)
    inside = (v >= qmin) & (v <= qmax)
    torch.testing.assert_close(y.detach(), q * s + beta)
    assert b.grad.item() == pytest.approx(g * grad_out[~inside].sum().item())
    torch.testing.assert_close(xo.grad, torch.where(inside, grad_out, 0.0))
    assert so.grad.item() == pytest.approx(g * (grad_out * torch.where(inside, q - v, q)).sum().item(), rel=1e-6)
    # clipped elements: the output moves one-for-one with beta (a real derivative, checked numerically)
    eps = 1e-3
    clipped = ~inside
    fd = (lsq_fake_quant(x, torch.tensor(s), qmin, qmax, 1.0, torch.tensor(beta + eps))
          - lsq_fake_quant(x, torch.tensor(s), qmin, qmax, 1.0, torch.tensor(beta - eps))) / (2 * eps)
    torch.testing.assert_close(fd[clipped], torch.ones(int(clipped.sum())), rtol=1e-3, atol=1e-3)
    assert clipped.any() and inside.any()


def test_offset_matches_oracle_on_shifted_input():
    qmin, qmax = int_range(4, False)
    beta = 0.75  # exactly representable, so x - beta is exact
    v = _v_values(qmin, qmax, 2000, seed=7)
    x = v * SCALE + beta
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    y0, gx0, gs0 = _oracle(x - beta, SCALE, qmin, qmax, 0.1, grad_out)
    y1, gx1, gs1 = _ours(x, SCALE, qmin, qmax, 0.1, grad_out, offset=torch.tensor(beta))
    torch.testing.assert_close(y1, y0 + beta, rtol=1e-6, atol=0)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=0)
    torch.testing.assert_close(gs1.reshape(1), gs0, rtol=1e-6, atol=1e-6)


def _group_check(quant: Quantizer, x: torch.Tensor, scales: torch.Tensor, slices):
    """Each group's slice of output and gradients equals the per-tensor oracle on that slice."""
    with torch.no_grad():
        quant.scale.copy_(scales)
    quant.initialized.fill_(True)
    xo = x.clone().requires_grad_()
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    y = quant(xo)
    y.backward(grad_out)
    g = quant.grad_scale(x)
    for i, sl in enumerate(slices):
        y0, gx0, gs0 = _oracle(x[sl], scales[i].item(), quant.qmin, quant.qmax, float(g), grad_out[sl])
        torch.testing.assert_close(y.detach()[sl], y0, rtol=1e-6, atol=0)
        torch.testing.assert_close(xo.grad[sl], gx0, rtol=1e-6, atol=0)
        torch.testing.assert_close(quant.scale.grad[i:i + 1], gs0, rtol=1e-6, atol=1e-7)


def _in_range(shape, qmin, qmax, scales, axis, seed):
    """Values strictly inside every group's range, away from ties (so the two conventions agree)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randint(qmin, qmax, shape, generator=gen).float() + 0.1 + 0.8 * torch.rand(shape, generator=gen)
    view = [1] * len(shape)
    view[axis] = -1
    return v * scales.repeat_interleave(shape[axis] // scales.numel()).view(view)


def test_per_channel_matches_per_slice_oracle():
    q = Quantizer(3, granularity="channel", axis=0, size=6, is_weight=True)
    scales = torch.tensor([2.0**-k for k in range(1, 7)])
    x = _in_range((6, 40), q.qmin, q.qmax, scales, 0, seed=11)
    x[0, :5] = 20.0  # some clipped values in channel 0
    _group_check(q, x, scales, [(slice(i, i + 1),) for i in range(6)])


def test_per_head_activation_matches_per_slice_oracle():
    heads = 4
    q = Quantizer(4, granularity="head", axis=1, size=heads, num_groups=heads)
    scales = torch.tensor([0.5, 0.125, 0.25, 2.0**-5])
    x = _in_range((2, heads, 5, 8), q.qmin, q.qmax, scales, 1, seed=12)
    x[1, 2, 0, :] = -50.0
    _group_check(q, x, scales, [(slice(None), slice(h, h + 1)) for h in range(heads)])


def test_per_head_weight_rows_and_columns():
    heads, hd = 3, 4
    scales = torch.tensor([0.5, 0.125, 0.25])
    rows = Quantizer(4, granularity="head", axis=0, size=heads * hd, num_groups=heads, is_weight=True)
    x = _in_range((heads * hd, 7), rows.qmin, rows.qmax, scales, 0, seed=13)
    _group_check(rows, x, scales, [(slice(h * hd, (h + 1) * hd),) for h in range(heads)])
    cols = Quantizer(4, granularity="head", axis=1, size=heads * hd, num_groups=heads, is_weight=True)
    x = _in_range((7, heads * hd), cols.qmin, cols.qmax, scales, 1, seed=14)
    _group_check(cols, x, scales, [(slice(None), slice(h * hd, (h + 1) * hd)) for h in range(heads)])


def test_codes_match_forward_and_dtype():
    q = Quantizer(3, granularity="channel", axis=0, size=4, is_weight=True)
    w = torch.randn(4, 9)
    q.init_from_tensor(w)
    codes = q.codes(w)
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= q.qmin and int(codes.max()) <= q.qmax
    torch.testing.assert_close(q(w).detach(), codes.float() * q.scale.detach()[:, None])
    torch.testing.assert_close(quant_codes(w, q.expanded_scale(w), q.qmin, q.qmax), codes)


def test_half_precision_input_keeps_dtype():
    x = torch.randn(64).to(torch.bfloat16).requires_grad_()
    y = lsq_fake_quant(x, torch.tensor(0.25, requires_grad=True), -8, 7)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.skipif(not fq.have_cxx_compiler(), reason="fused kernels need a C++ compiler")
def test_fused_kernels_match_eager():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 16, 16, generator=gen) * 2
    s = torch.tensor([0.3, 0.2, 0.7]).view(1, 3, 1, 1)
    b = torch.tensor([0.1, -0.2, 0.05]).view(1, 3, 1, 1)
    grad_out = torch.randn(x.shape, generator=gen)
    res = {}
    for mode in ("0", "1"):
        fq.set_fused_kernels(mode)
        xo, so, bo = x.clone().requires_grad_(), s.clone().requires_grad_(), b.clone().requires_grad_()
        y = lsq_fake_quant(xo, so, 0, 15, 0.3, bo)
        y.backward(grad_out)
        res[mode] = (y.detach(), xo.grad, so.grad, bo.grad)
    assert fq.fused_kernels_mode() == "1", "torch.compile failed although a compiler is present"
    for a, c in zip(res["0"], res["1"], strict=True):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["1"][0], res["0"][0], rtol=0, atol=0)  # the forward is exact


def test_set_fused_kernels_rejects_unknown_mode():
    with pytest.raises(ValueError, match="fused-kernel mode"):
        fq.set_fused_kernels("sometimes")
