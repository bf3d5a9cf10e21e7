"""Quantizer modules: gradient-scale modes, MSE initialisation, errors and state."""
from __future__ import annotations

import math

import pytest
import torch

from vvtq.quant import Quantizer, QuantizerError, mse_fit_scale
from vvtq.quant import fake_quant as fq


@pytest.fixture(autouse=True)
def _eager():
    with fq.fused_kernels("0"):
        yield


def _scale_grad(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    q.scale.grad = None
    q(x).backward(torch.linspace(-1, 1, x.numel()).view(x.shape))
    return q.scale.grad.clone()


def _ready(mode: str, is_weight: bool, **kw) -> Quantizer:
    q = Quantizer(4, grad_scale_mode=mode, is_weight=is_weight, **kw)
    with torch.no_grad():
        q.scale.fill_(0.1)
    q.initialized.fill_(True)
    return q


@pytest.mark.parametrize("is_weight", [True, False])
def test_grad_scale_modes_give_documented_factors(is_weight):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, 10, generator=gen)  # batch 8 for activations
    kw = dict(granularity="channel", axis=-1, size=10) if not is_weight else dict(granularity="tensor")
    base = _scale_grad(_ready("none", is_weight, **kw), x)
    groups = 10 if not is_weight else 1
    per_group = x.numel() / groups
    qp = 7
    expected = {
        # LSQ: 1/sqrt(N * Qp), N = elements per scale (per sample for activations)
        "lsq": 1 / math.sqrt((per_group if is_weight else per_group / 8) * qp),
        # reference: weights 1/sqrt(sum|W| * Qp), activations 1/(sqrt(N) * Qp), N including the batch
        "reference": (1 / math.sqrt(x.abs().sum().item() * qp)) if is_weight else 1 / (math.sqrt(per_group) * qp),
        "none": 1.0,
    }
    for mode, factor in expected.items():
        q = _ready(mode, is_weight, **kw)
        assert float(q.grad_scale(x)) == pytest.approx(factor, rel=1e-6)
        torch.testing.assert_close(_scale_grad(q, x), base * factor, rtol=1e-5, atol=1e-9)


def test_mse_init_converges_and_beats_max_scaling():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 5000, generator=gen) * torch.tensor([[0.1], [1.0], [3.0]])
    rows[1, :3] = 12.0  # an outlier: max-scaling wastes the range on it
    for qmin, qmax in ((-2, 1), (-8, 7), (0, 15)):
        data = rows.abs() if qmin == 0 else rows
        s = mse_fit_scale(data, qmin, qmax, max_iter=1000)  # heavy tails from s = max/Qp can need ~200 rounds
        s_max = data.abs().amax(dim=1) / qmax

        def mse(scale, data=data, qmin=qmin, qmax=qmax):
            return ((torch.clamp(torch.round(data / scale[:, None]), qmin, qmax) * scale[:, None] - data) ** 2
                    ).mean(dim=1)

        assert (mse(s) <= mse(s_max)).all()
        assert (mse(s) < mse(s_max)).any()
        assert (mse(mse_fit_scale(data, qmin, qmax)) <= mse(s_max)).all()  # also with the default cap
        # converged: one more refit moves the scale by less than the tolerance
        qv = torch.clamp(torch.round(data / s[:, None]), qmin, qmax)
        s_next = (data * qv).sum(1) / (qv * qv).sum(1)
        assert ((s_next - s).abs() / s).max() < 1e-4


def test_mse_init_iteration_cap():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(2, 3000, generator=gen)
    qmin, qmax = -2, 1
    s = rows.abs().amax(1) / qmax
    for k in range(1, 4):
        qv = torch.clamp(torch.round(rows / s[:, None]), qmin, qmax)
        s = (rows * qv).sum(1) / (qv * qv).sum(1)
        # tol=0 never stops early, so exactly k rounds run
        torch.testing.assert_close(mse_fit_scale(rows, qmin, qmax, max_iter=k, tol=0.0), s)
    # slow-converging data (heavy tail, unsigned): the cap cuts the fit short at exactly max_iter rounds
    data = rows.abs() ** 3
    s = data.amax(1) / 15
    for _ in range(7):
        qv = torch.clamp(torch.round(data / s[:, None]), 0, 15)
        s = (data * qv).sum(1) / (qv * qv).sum(1)
    capped = mse_fit_scale(data, 0, 15, max_iter=7)
    torch.testing.assert_close(capped, s)
    assert not torch.allclose(capped, mse_fit_scale(data, 0, 15, max_iter=1000), rtol=1e-4, atol=0)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 31, 64, -4, 4.0, True, "4"])
def test_quantizer_rejects_bad_bits(bits):
    with pytest.raises(QuantizerError, match=r"2\.\.8, or 32"):
        Quantizer(bits)


def test_head_count_must_divide_width():
    with pytest.raises(QuantizerError, match="head count to divide the width.*10 channels, 3 heads"):
        Quantizer(4, granularity="head", size=10, num_groups=3, name="blocks.0.attn.q.weight_quant")


def test_uninitialised_quantizer_names_its_path():
    q = Quantizer(4, name="blocks.2.mlp.fc1.input_quant")
    with pytest.raises(QuantizerError, match=r"blocks\.2\.mlp\.fc1\.input_quant.*before its scale was initialised"):
        q(torch.randn(3))


def test_observe_then_initialise_and_disable():
    q = Quantizer(4, signed=False, granularity="head", axis=1, size=2, num_groups=2, init_method="lsq")
    x = torch.rand(4, 2, 8) * torch.tensor([1.0, 3.0]).view(1, 2, 1)
    q.start_observing()
    assert q(x) is x  # passes data through while observing
    q.finish_observing()
    assert bool(q.initialized)
    expected = 2 * x.movedim(1, 0).reshape(2, -1).abs().mean(1) / math.sqrt(15)  # unsigned Qp = 15
    torch.testing.assert_close(q.scale.detach(), expected)
    q.set_enabled(False)
    assert not q.enabled and q(x) is x
    q.set_enabled(True)
    assert q.enabled and not torch.equal(q(x), x)


def test_no_data_during_calibration_is_an_error():
    q = Quantizer(4, name="blocks.0.attn.input_quant")
    q.start_observing()
    with pytest.raises(QuantizerError, match=r"blocks\.0\.attn\.input_quant.*saw no data"):
        q.finish_observing()


def test_state_dict_bit_mismatch_names_bits():
    src = Quantizer(4, granularity="channel", size=3, is_weight=True)
    dst = Quantizer(2, granularity="channel", size=3, is_weight=True)
    with pytest.raises(RuntimeError, match="saved with 4-bit.*configured for 2 bits"):
        dst.load_state_dict(src.state_dict())
    other = Quantizer(4, granularity="tensor", is_weight=True)
    with pytest.raises(RuntimeError, match="granularity"):
        other.load_state_dict(src.state_dict())


def test_32_bits_is_identity_without_learning():
    q = Quantizer(32)
    x = torch.randn(5)
    assert not q.enabled and q(x) is x and not q.scale.requires_grad


def test_a_step_pushed_below_zero_keeps_its_gradient_and_recovers():
    """Seen in study v2: AdamW pushed per-channel weight steps below zero; under a plain clamp they stayed dead."""
    w = torch.randn(4, 16)
    q = Quantizer(2, granularity="channel", size=4, axis=0, is_weight=True)
    with torch.no_grad():
        q.scale.copy_(torch.tensor([0.5, -0.01, 0.5, 0.5]))
    q.initialized.fill_(True)
    out = q(w)
    assert out[1].abs().max() <= 2e-8  # the floor step: the whole row is ~0
    assert torch.equal(out[0], q.scale[0].detach() * (w[0] / q.scale[0].detach()).round().clamp(-2, 1))
    ((out - w) ** 2).sum().backward()
    assert q.scale.grad[1] < 0  # the loss asks for a larger step: the gradient reaches the dead one
    opt = torch.optim.Adam([q.scale], lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        ((q(w) - w) ** 2).sum().backward()
        opt.step()
    assert q.scale[1] > 0.05 and q(w)[1].abs().max() > 0.05
