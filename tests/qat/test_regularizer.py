"""Tests for vvtq.qat.regularizer: the vectorized bin regularizer vs a naive per-bin loop, schedule, model sum,
the lever."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fakes import FakeQuantizer
from vvtq.qat.regularizer import (
    BinRegularizer,
    RegularizerSettings,
    bin_regularizer,
    bin_regularizer_loss,
    lambda_schedule,
)
from vvtq.quant import fake_quant as fq


def int_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def naive(w, s, qmin, qmax, variance="unbiased", weighting="none", bins="tensor"):
    """Straightforward per-bin Python loop (float64), an independent formulation of R."""
    per_group = s.numel() > 1
    s = s.expand_as(w)
    w_c = torch.minimum(torch.maximum(w, s * qmin), s * qmax)
    code = torch.clamp(torch.round(w.detach() / s.detach()), qmin, qmax)
    r = ((w_c - (s * code).detach()) ** 2).mean()
    groups = [torch.ones_like(w, dtype=torch.bool)]
    if bins == "group" and per_group:  # per-tensor scale: one group
        groups = [(torch.arange(w.shape[0])[:, None] == g).expand_as(w) for g in range(w.shape[0])]
    n_total = w.numel()
    for gmask in groups:
        for j in range(qmin, qmax + 1):
            members = w_c[(code == j) & gmask]
            n = members.numel()
            if n < 2:
                continue
            ss = ((members - members.mean()) ** 2).sum()
            var = ss / (n - 1) if variance == "unbiased" else ss / n
            if weighting == "size":
                var = var * n / n_total
            r = r + var
    return r


def make_case(bits: int, per_channel: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 10 * bits + per_channel)
    qmin, qmax = int_range(bits)
    rows, cols = 6, 40
    if per_channel:
        s = (0.05 + 0.1 * torch.rand(rows, 1, generator=g, dtype=torch.float64))
    else:
        s = torch.tensor(0.1, dtype=torch.float64)
    # wide spread: some weights clipped at both ends
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * (qmax * 0.6) * s
    se = s.expand_as(w)
    # make bin qmin+1 empty and bin qmax-1 hold exactly one member: move their weights into bin qmax / qmin
    empty, single = qmin + 1, qmax - 1
    code = torch.clamp(torch.round(w / se), qmin, qmax)
    jitter = torch.rand(rows, cols, generator=g, dtype=torch.float64) * 0.8 - 0.4
    w = torch.where(code == empty, se * (qmin + jitter), w)
    w = torch.where(code == single, se * (qmax + jitter), w)
    w[2, 1] = se[2, 1] * (single + 0.2)  # the single member
    w[0, 0] = se[0, 0] * (qmax + 3.3)  # clipped high
    w[1, 0] = se[1, 0] * (qmin - 2.7)  # clipped low
    w = w.clone().requires_grad_(True)
    s = s.clone().requires_grad_(True)
    return w, s, qmin, qmax


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"variance": "population"},
        {"weighting": "size"},
        {"bins": "group"},
        {"variance": "population", "weighting": "size", "bins": "group"},
    ],
)
def test_matches_naive_loop_value_and_grad(bits, per_channel, opts):
    w, s, qmin, qmax = make_case(bits, per_channel)
    r_fast = bin_regularizer(w, s, qmin, qmax, **opts)
    gw_fast, gs_fast = torch.autograd.grad(r_fast, (w, s))
    r_ref = naive(w, s, qmin, qmax, **opts)
    gw_ref, gs_ref = torch.autograd.grad(r_ref, (w, s))
    assert r_fast.dtype == torch.float64
    torch.testing.assert_close(r_fast, r_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gw_fast, gw_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gs_fast, gs_ref, rtol=1e-6, atol=1e-9)
    assert gs_fast.abs().sum() > 0  # the clipped weights give the scale a gradient


def test_case_has_empty_single_and_clipped_bins():
    w, s, qmin, qmax = make_case(4, False)
    code = torch.clamp(torch.round(w.detach() / s.detach()), qmin, qmax)
    counts = torch.bincount((code - qmin).long().flatten(), minlength=qmax - qmin + 1)
    assert (counts == 0).any() and (counts == 1).any()
    assert (w.detach() / s.detach() > qmax + 0.5).any() and (w.detach() / s.detach() < qmin - 0.5).any()


def test_float32_matches_float64():
    w, s, qmin, qmax = make_case(3, True)
    r64 = bin_regularizer(w.detach(), s.detach(), qmin, qmax)
    r32 = bin_regularizer(w.detach().float(), s.detach().float(), qmin, qmax)
    assert r32.dtype == torch.float32
    assert math.isclose(float(r32), float(r64), rel_tol=1e-5)


def test_gradcheck_wrt_w():
    # (finite differences in s would also move stopgrad(w_hat) = s * code, so only w is checked this way)
    torch.manual_seed(0)
    s = torch.tensor([[0.1], [0.2]], dtype=torch.float64)
    w = (torch.randn(2, 12, dtype=torch.float64) * 0.3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: bin_regularizer(w, s, -4, 3), (w,), eps=1e-7, atol=1e-6)


def test_zero_when_on_levels_and_single_members():
    s = torch.tensor(0.5)
    w = torch.tensor([-1.0, 0.0, 0.5, 1.0, -0.5]).requires_grad_(True)  # each on its own level
    r = bin_regularizer(w, s, -2, 1)
    assert float(r.detach()) == 0.0
    r.backward()
    assert torch.all(w.grad == 0)


def test_integer_codes_miss_no_weight():
    """Bins from integer codes cover every weight; the reference's float-equality membership does not."""
    torch.manual_seed(0)
    missed_ref = 0
    for bits in (3, 4):
        qmin, qmax = int_range(bits)
        s = torch.rand(64, 1) * 0.05 + 0.003
        w = torch.randn(64, 256) * s * qmax / 2
        code = torch.clamp(torch.round(w / s), qmin, qmax)
        counts = torch.bincount((code - qmin).long().flatten(), minlength=qmax - qmin + 1)
        assert int(counts.sum()) == w.numel()
        # reference: w_hat = s*q, members of bin j where w_hat / s == j (float equality)
        w_hat = s * code
        ref_members = sum(int(((w_hat / s) == j).sum()) for j in range(qmin, qmax + 1))
        missed_ref += w.numel() - ref_members
    assert missed_ref > 0


def test_empty_tensor():
    w = torch.zeros(0, 4, requires_grad=True)
    r = bin_regularizer(w, torch.tensor(0.1), -2, 1)
    assert float(r.detach()) == 0.0


def test_bad_args():
    w = torch.randn(3)
    with pytest.raises(ValueError):
        bin_regularizer(w, 0.1, -2, 1, variance="biased")
    with pytest.raises(ValueError):
        bin_regularizer(w, 0.1, -2, 1, weighting="count")
    with pytest.raises(ValueError):
        bin_regularizer(w, 0.1, 2, 1)


def test_lambda_schedule():
    T = 1000
    assert lambda_schedule(0, T) == 0.0
    assert lambda_schedule(249, T) == 0.0
    assert lambda_schedule(250, T) == 0.0
    assert lambda_schedule(625, T) == pytest.approx(0.005)
    assert lambda_schedule(T, T) == pytest.approx(0.01)
    assert lambda_schedule(T + 50, T) == pytest.approx(0.01)
    assert lambda_schedule(400, T, lambda_max=1.0) == pytest.approx((1 - math.cos(math.pi * 0.2)) / 2)
    vals = [lambda_schedule(t, T) for t in range(T + 1)]
    assert all(b >= a for a, b in zip(vals, vals[1:], strict=False))


def make_pairs():
    torch.manual_seed(0)
    lins = [nn.Linear(16, 8), nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)]
    qs = [
        FakeQuantizer(4, [0.05] * 8, "a"),
        FakeQuantizer(2, 0.2, "b"),
        FakeQuantizer(8, 0.01, "c"),
        FakeQuantizer(3, 0.1, "d", enabled=False),
    ]
    return list(zip(lins, qs, strict=True))


def test_model_loss_sums_layers_and_skips():
    pairs = make_pairs()
    expected = sum(
        bin_regularizer(m.weight, q.expanded_scale(m.weight), q.qmin, q.qmax) for m, q in pairs[:2]
    )
    torch.testing.assert_close(bin_regularizer_loss(pairs), expected)
    with_8bit = expected + bin_regularizer(pairs[2][0].weight, 0.01, -128, 127)
    torch.testing.assert_close(bin_regularizer_loss(pairs, skip_bits_ge=None), with_8bit)
    assert float(bin_regularizer_loss(pairs[2:])) == 0.0


def test_model_regularizer_schedule_and_grads():
    pairs = make_pairs()
    reg = BinRegularizer(pairs, total_steps=100)
    assert float(reg(10)) == 0.0
    assert reg.metrics() == {"reg/lambda": 0.0}
    out = reg(100)
    torch.testing.assert_close(out, 0.01 * bin_regularizer_loss(pairs))
    out.backward()
    assert pairs[0][0].weight.grad.abs().sum() > 0
    assert pairs[2][0].weight.grad is None  # 8-bit layer skipped
    m = reg.metrics()
    assert m["reg/lambda"] == pytest.approx(0.01) and m["reg/R"] > 0


def test_model_regularizer_accepts_module():
    model = nn.Sequential(nn.Linear(4, 4))
    assert float(bin_regularizer_loss(model)) == 0.0  # no quantizers → 0


def test_step_units_are_weight_units_divided_by_the_step():
    """``units="step"``: R of ``w / s`` with a unit step, so the gradient reaches the weights only."""
    torch.manual_seed(0)
    w = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64).view(6, 1).requires_grad_(True)
    for bins in ("tensor", "group"):
        r = bin_regularizer(w, s, -2, 1, bins=bins, weighting="size", units="step")
        ref = bin_regularizer((w / s).detach().requires_grad_(True), torch.ones_like(s), -2, 1, bins=bins,
                              weighting="size")
        assert torch.allclose(r, ref)
        gw, gs = torch.autograd.grad(r, (w, s), allow_unused=True)
        assert gs is None or torch.count_nonzero(gs) == 0
        assert torch.count_nonzero(gw) > 0
    with pytest.raises(ValueError, match="units"):
        bin_regularizer(w, s, -2, 1, units="bits")


def test_lever_options_are_its_settings():
    pairs = make_pairs()
    by_kwargs = BinRegularizer(pairs, 100, lambda_max=0.5, start_frac=0.0, bins="group")
    by_settings = BinRegularizer(pairs, 100, settings=RegularizerSettings(lambda_max=0.5, start_frac=0.0, bins="group"))
    by_position = BinRegularizer(pairs, 100, 0.5, 0.0, bins="group")  # the order of the old ModelBinRegularizer
    torch.testing.assert_close(by_kwargs(50), by_settings(50))
    torch.testing.assert_close(by_kwargs(50), by_position(50))
    with pytest.raises(ValueError, match="bins"):
        BinRegularizer(pairs, 100, bins="layer")


@pytest.mark.skipif(not fq.have_cxx_compiler(), reason="fused kernels need a C++ compiler")
@pytest.mark.parametrize(("bits", "opts"), [(2, {}), (4, {"bins": "group", "weighting": "size", "units": "step"})])
def test_fused_kernels_match_eager(bits, opts):
    """The compiled one-pass kernels (float32 CPU) give the eager chain's R and gradients."""
    torch.manual_seed(bits)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = (torch.randn(32, 80) * 0.05).requires_grad_(True)
    w.data[0, :4] = torch.tensor([9.0, -9.0, 0.0, 0.0])  # clipped high and low, and exactly on a level
    s = (torch.rand(32, 1) * 0.02 + 0.01).requires_grad_(True)
    out = []
    for mode in ("0", "1"):
        with fq.fused_kernels(mode):
            r = bin_regularizer(w, s, qmin, qmax, **opts)
            out.append((r, *torch.autograd.grad(r, (w, s), allow_unused=True)))
            assert fq.fused_kernels_mode() == mode, "torch.compile failed although a compiler is present"
    (r0, gw0, gs0), (r1, gw1, gs1) = out
    torch.testing.assert_close(r1, r0, rtol=1e-5, atol=0)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-6 * float(gw0.abs().max()))
    if gs0 is not None:
        torch.testing.assert_close(gs1, gs0, rtol=1e-4, atol=1e-6 * float(gs0.abs().max()))
    assert gw0.abs().sum() > 0


@pytest.mark.skipif(not fq.have_cxx_compiler(), reason="fused kernels need a C++ compiler")
@pytest.mark.parametrize("opts", [{}, {"bins": "group", "weighting": "size"}, {"units": "step"}])
def test_fused_model_loss_stacks_same_shape_layers(opts):
    """With fused kernels, layers of one shape go through one stacked call; R and every weight's and step's
    gradient equal the per-layer eager sum (per-channel and per-tensor steps, a different bit-width between)."""
    torch.manual_seed(3)
    lins = [nn.Linear(96, 48) for _ in range(4)] + [nn.Linear(48, 96)]
    for lin in lins:
        lin.weight.data.mul_(3.0)
    qs = [FakeQuantizer(4, (torch.rand(48) * 0.02 + 0.01).tolist(), "a"), FakeQuantizer(2, 0.05, "b"),
          FakeQuantizer(4, (torch.rand(48) * 0.02 + 0.01).tolist(), "c"), FakeQuantizer(2, 0.04, "d"),
          FakeQuantizer(3, (torch.rand(96) * 0.02 + 0.01).tolist(), "e")]
    pairs = list(zip(lins, qs, strict=True))
    params = [p for lin, q in pairs for p in (lin.weight, q.scale)]
    out = []
    for mode in ("0", "1"):
        with fq.fused_kernels(mode):
            r = bin_regularizer_loss(pairs, **opts)
            out.append((r, torch.autograd.grad(r, params, allow_unused=True)))
            assert fq.fused_kernels_mode() == mode, "torch.compile failed although a compiler is present"
    (r0, g0), (r1, g1) = out
    torch.testing.assert_close(r1, r0, rtol=1e-5, atol=0)
    for a, b in zip(g0, g1, strict=True):
        if a is None or b is None:
            assert a is None or torch.count_nonzero(a) == 0
            assert b is None or torch.count_nonzero(b) == 0
            continue
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()) + 1e-12)
    assert any(g is not None and g.abs().sum() > 0 for g in g0)
