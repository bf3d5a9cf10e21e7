"""Calibration: every enabled quantizer gets a fitted scale; unsigned sites use the unsigned range."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from vvtq.quant import (
    QuantConfig,
    Quantizer,
    QuantizerError,
    calibrate,
    iter_act_quantizers,
    iter_weight_quantizers,
    mse_fit_scale,
    quantize_model,
)
from vvtq.quant import fake_quant as fq


@pytest.fixture(autouse=True)
def _eager():
    with fq.fused_kernels("0"):
        yield


def _converted(name="mini_deit", **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    return quantize_model(model, QuantConfig.preset("vvtq", **kw))


def _batches(n=2, shape=(1, 28, 28)):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, *shape, generator=gen) for _ in range(n)]


@pytest.mark.parametrize(("name", "shape"), [("mini_deit", (1, 28, 28)), ("mini_swin", (1, 32, 32))])
def test_every_enabled_quantizer_is_initialised(name, shape):
    model = _converted(name, wbits=3, abits=3, overrides={"blocks.0.*": {"abits": 32}} if name == "mini_deit"
                       else {})
    model.train()
    calibrate(model, _batches(3, shape), num_batches=2)
    assert model.training  # the mode is restored
    for m in model.modules():
        if isinstance(m, Quantizer):
            assert bool(m.initialized) == m.enabled, m.name
            if m.enabled:
                assert (m.scale > 0).all() and not torch.equal(m.scale.detach(), torch.ones_like(m.scale)), m.name
    layer, q = next((layer, q) for layer, q in iter_weight_quantizers(model) if q.kind == "fc1")
    torch.testing.assert_close(q.scale.detach(), mse_fit_scale(q._rows(layer.weight.detach()), q.qmin, q.qmax))


def test_unsigned_softmax_quantizer_uses_unsigned_range():
    model = _converted(wbits=4, abits=4)
    attn = model.blocks[0].attn
    assert (attn.attn_quant.qmin, attn.attn_quant.qmax, attn.attn_quant.signed) == (0, 15, False)
    probs = {}
    attn.attn_quant.register_forward_pre_hook(lambda m, a: probs.__setitem__("p", a[0].detach().clone()))
    x = _batches(1)
    calibrate(model, x)
    rows = probs["p"].movedim(1, 0).reshape(attn.num_heads, -1)
    torch.testing.assert_close(attn.attn_quant.scale.detach(), mse_fit_scale(rows, 0, 15))
    signed_fit = mse_fit_scale(rows, -8, 7)
    assert ((attn.attn_quant.scale - signed_fit).abs() > 1e-4 * signed_fit).all()
    fc2_in = model.blocks[0].mlp.fc2.input_quant  # GELU output: unsigned with an offset at the minimum
    assert (fc2_in.qmin, fc2_in.qmax) == (0, 15) and fc2_in.offset is not None
    assert (fc2_in.offset <= 0).all() and (fc2_in.offset > -0.2).all()  # GELU's minimum is about -0.17


def test_lsq_rule_uses_unsigned_qp():
    model = _converted(wbits=4, abits=4, act_init="lsq")
    attn = model.blocks[0].attn
    probs = {}
    attn.attn_quant.register_forward_pre_hook(lambda m, a: probs.__setitem__("p", a[0].detach().clone()))
    calibrate(model, _batches(1))
    mean_abs = probs["p"].movedim(1, 0).reshape(attn.num_heads, -1).abs().mean(1)
    torch.testing.assert_close(attn.attn_quant.scale.detach(), 2 * mean_abs / math.sqrt(15))


def test_calibration_errors():
    model = _converted()
    with pytest.raises(QuantizerError, match="needs input batches"):
        calibrate(model)
    with pytest.raises(QuantizerError, match="empty iterable"):
        calibrate(model, [])
    assert all(q._observer is None for q in iter_act_quantizers(model))  # no observer left behind
    with pytest.raises(QuantizerError, match="converted by vvtq.quantize_model"):
        calibrate(torch.nn.Linear(2, 2), [torch.randn(1, 2)])


def test_calibrated_model_runs_and_is_deterministic():
    model = _converted(wbits=2, abits=2)
    xs = _batches(1)
    calibrate(model, xs)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(xs[0]), model(xs[0]))
