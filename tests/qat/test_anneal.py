"""Tests for vvtq.qat.anneal: the band schedule, the confidence, and that held weights do not move under AdamW."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fakes import FakeQuantizer
from vvtq.qat.anneal import ConfidenceAnnealer
from vvtq.quant.quantizers import Quantizer


def _layer(bits: int = 2, seed: int = 0) -> tuple[nn.Linear, Quantizer]:
    torch.manual_seed(seed)
    lin = nn.Linear(16, 8)
    q = Quantizer(bits, signed=True, granularity="channel", axis=0, size=8, is_weight=True, name="fc.weight_quant")
    q.init_from_tensor(lin.weight)
    return lin, q


def test_band_is_half_a_step_then_a_cosine_to_zero():
    a = ConfidenceAnnealer([], total_steps=101, start_frac=0.5)
    assert a.start == 50
    assert [a.band(t) for t in (0, 49, 50)] == [0.5, 0.5, 0.5]
    assert a.band(75) == pytest.approx(0.25) and a.band(100) == pytest.approx(0.0, abs=1e-12)
    bands = [a.band(t) for t in range(50, 101)]
    assert all(x >= y for x, y in zip(bands, bands[1:], strict=False))
    assert a.band(60) == pytest.approx(0.25 * (1 + math.cos(math.pi * 10 / 50)))


def test_confidence_is_the_distance_to_the_nearest_threshold_in_steps():
    q = FakeQuantizer(2, 0.5, "fc.weight_quant")  # levels -1, -0.5, 0, 0.5; thresholds halfway between
    w = torch.tensor([0.0, 0.25, 0.2, -0.6, 3.0, -0.74])
    d = ConfidenceAnnealer.confidence(w, q)
    # u = 0, 0.5, 0.4, -1.2, 1 (clipped from 6), -1.48
    assert torch.allclose(d, torch.tensor([0.5, 0.0, 0.1, 0.3, 0.5, 0.02]), atol=1e-6)


def test_held_weights_stay_put_under_adamw_and_the_rest_train():
    lin, q = _layer()
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.05)
    a = ConfidenceAnnealer([(lin, q)], total_steps=20, start_frac=0.5)
    x = torch.randn(32, 16)
    for step in range(20):
        before = lin.weight.detach().clone()
        opt.zero_grad()
        lin(x).pow(2).mean().backward()  # latent weights only; the momentum of earlier steps keeps pushing
        a.after_backward(step)
        hold = a.confidence(before, q) >= a.band(step)
        opt.step()
        a.after_step(step)
        if step < 10:
            assert a.metrics()["cga/held"] == 0.0
            continue
        assert torch.equal(lin.weight[hold], before[hold])
        assert a.metrics()["cga/held"] == pytest.approx(hold.float().mean().item())
        if (~hold).any():
            assert not torch.equal(lin.weight[~hold], before[~hold])
    assert a.metrics()["cga/held"] == 1.0  # the last step holds every weight
    assert not torch.equal(lin.bias.grad, torch.zeros_like(lin.bias))  # the bias is not annealed


def test_8_bit_and_disabled_layers_are_left_alone():
    low, q2 = _layer(2)
    high, q8 = _layer(8)
    off = nn.Linear(4, 4)
    a = ConfidenceAnnealer([(low, q2), (high, q8), (off, FakeQuantizer(2, 0.1, "off", enabled=False))], 10, 0.0)
    assert [m for m, _ in a.pairs] == [low]
    assert ConfidenceAnnealer([(high, q8)], 10, 0.0, max_bits=8).pairs[0][0] is high


@pytest.mark.parametrize("kwargs, message", [
    ({"start_frac": 1.0}, r"start_frac must be in \[0, 1\)"),
    ({"start_frac": -0.1}, r"start_frac must be in \[0, 1\)"),
    ({"max_bits": 9}, "max_bits must be an integer in 2..8"),
    ({"max_bits": 4.0}, "max_bits must be an integer in 2..8"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConfidenceAnnealer([], 10, **kwargs)
