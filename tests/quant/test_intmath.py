"""Integer-domain arithmetic: the code formulas equal the fake-quant maths, and accumulations are exact."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vvtq.quant import Quantizer
from vvtq.quant.intmath import QT, QWeight, exact, int_attention, int_conv2d, int_linear, qmatmul, quantize


def _act(x: torch.Tensor, bits: int, groups: int, axis: int, offset: bool, signed: bool = True) -> QT:
    g = torch.Generator().manual_seed(bits * 10 + groups)
    scale = torch.rand(groups, generator=g, dtype=x.dtype) * 0.3 + 0.05
    beta = -torch.rand(groups, generator=g, dtype=x.dtype) * 0.2 if offset else None
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return quantize(x, scale, beta, axis, groups, qmin, qmax)


def _weight(o: int, i: int, bits: int, groups: int, axis: int, dtype=torch.float64) -> QWeight:
    g = torch.Generator().manual_seed(o + i + groups)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.randint(lo, hi + 1, (o, i), generator=g).to(dtype)
    scale = torch.rand(groups, generator=g, dtype=dtype) * 0.1 + 0.01
    return QWeight(codes, scale, axis, groups, max(-lo, hi))


def test_exact_falls_back_to_float64_above_the_float32_mantissa():
    # 8-bit codes over K = 1024: partial sums reach 2^25, where float32 would drop the odd unit
    a = torch.full((3, 1024), 255.0)
    a[:, 0] = 1.0
    b = torch.full((2, 1024), 127.0)
    b[:, 0] = 1.0
    want = (a.long() @ b.long().t()).to(torch.float32)  # the exact integer, rounded once
    got = exact(lambda u, v: u @ v.t(), 1024 * 255 * 128, a, b)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # below the bound the working dtype is used, and integer sums are exact in it
    small = torch.randint(-2, 2, (4, 64)).float()
    assert torch.equal(exact(lambda u, v: u @ v.t(), 64 * 4, small, small),
                       (small.long() @ small.long().t()).float())


@pytest.mark.parametrize("x_groups,offset", [(1, False), (1, True), (4, False), (4, True)])
@pytest.mark.parametrize("w_groups,w_axis", [(1, 0), (6, 0), (4, 1)])
def test_int_linear_equals_fake_quant_linear(x_groups, offset, w_groups, w_axis):
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    qx = _act(x, 3, x_groups, -1, offset)
    qw = _weight(6, 32, 2, w_groups, w_axis)
    bias = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(int_linear(qx, qw, bias), F.linear(qx.value(), qw.value(), bias),
                               rtol=1e-12, atol=1e-12)
    # float32: the same maths to float rounding
    qx32, qw32 = _act(x.float(), 3, x_groups, -1, offset), _weight(6, 32, 2, w_groups, w_axis, torch.float32)
    torch.testing.assert_close(int_linear(qx32, qw32, bias.float()), F.linear(qx32.value(), qw32.value(), bias.float()),
                               rtol=1e-5, atol=1e-5)


def test_int_linear_float_operands_and_value():
    x = torch.randn(3, 8, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(int_linear(x, w, None), x @ w.t())
    qw = _weight(4, 8, 4, 4, 0)
    torch.testing.assert_close(int_linear(x, qw, None), x @ qw.value().t())
    # per-channel input scales (more groups than MAX_GROUP_SPLIT): multiply the dequantized values
    qx = _act(x, 4, 8, -1, False)
    torch.testing.assert_close(int_linear(qx, qw, None), qx.value() @ qw.value().t())


@pytest.mark.parametrize("offset", [False, True])
def test_int_conv2d_equals_fake_quant_conv(offset):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    qx = _act(x, 8, 3, 1, offset, signed=not offset)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (5, 3, 4, 4), generator=g).double()
    qw = QWeight(codes, torch.rand(5, generator=g, dtype=torch.float64) * 0.01, 0, 5, 128)
    bias = torch.randn(5, dtype=torch.float64)
    got = int_conv2d(qx, qw, bias, (4, 4), (0, 0), (1, 1), 1)
    torch.testing.assert_close(got, F.conv2d(qx.value(), qw.value(), bias, 4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offsets", [(False, False), (True, False), (False, True), (True, True)])
def test_qmatmul_folds_offsets(offsets):
    a = _act(torch.randn(2, 3, 5, 7, dtype=torch.float64), 4, 3, 1, offsets[0])
    b = _act(torch.randn(2, 3, 7, 4, dtype=torch.float64), 2, 3, 1, offsets[1])
    torch.testing.assert_close(qmatmul(a, b), a.value() @ b.value(), rtol=1e-12, atol=1e-12)
    # groups along the contraction axis: no common scale, so the dequantized product
    c = _act(torch.randn(2, 3, 5, 7, dtype=torch.float64), 4, 7, -1, False)
    torch.testing.assert_close(qmatmul(c, b), c.value() @ b.value())


def test_transpose_keeps_the_groups_axis():
    t = _act(torch.randn(2, 3, 5, 6, dtype=torch.float64), 4, 6, -1, True)
    tt = t.transpose_last()
    assert tt.axis == 2 and torch.equal(tt.value(), t.value().transpose(-2, -1))
    h = _act(torch.randn(2, 3, 5, 6, dtype=torch.float64), 4, 3, 1, False)
    assert h.transpose_last().axis == 1


def test_int_attention_equals_fake_quant_attention():
    q, k, v = (_act(torch.randn(2, 3, 5, 4, dtype=torch.float64), 4, 3, 1, False) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5, dtype=torch.float64)

    def probs(p):
        return quantize(p, torch.full((3,), 1 / 15, dtype=p.dtype), None, 1, 3, 0, 15)

    got = int_attention(q, k, v, 0.5, bias, probs)
    p = ((q.value() @ k.value().transpose(-2, -1)) * 0.5 + bias).softmax(-1)
    torch.testing.assert_close(got, probs(p).value() @ v.value(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(int_attention(q, k, v, 0.5, None, None),
                               ((q.value() @ k.value().transpose(-2, -1)) * 0.5).softmax(-1) @ v.value())


@pytest.mark.parametrize("granularity,offset", [("tensor", False), ("head", True), ("channel", False)])
def test_quantizer_codes_and_quantize_agree(granularity, offset):
    q = Quantizer(3, granularity=granularity, axis=-1, size=12, num_groups=4, learn_offset=offset)
    x = torch.randn(6, 12) * 2
    q.init_from_tensor(x)
    qt = q.quantize(x)
    assert torch.equal(qt.codes, q.codes(x).float())
    assert torch.equal(qt.value(), q(x).detach())  # the fake quantizer's output, bit for bit
    w = Quantizer(2, granularity=granularity, axis=0, size=6, num_groups=3, is_weight=True)
    w.init_from_tensor(x)
    assert torch.equal(w.quantize_weight(x).value(), w(x).detach())
