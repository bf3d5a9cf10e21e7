"""Quantized layers: evaluation runs in the integer domain only when nothing needs the fake-quant path."""
from __future__ import annotations

import pytest
import timm
import torch

import vvtq.models  # noqa: F401
from vvtq.quant import QuantConfig, attention, calibrate, iter_act_quantizers, modules, quantize_model
from vvtq.quant import fake_quant as fq
from vvtq.quant.modules import set_integer_eval


@pytest.fixture(autouse=True)
def _eager():
    with fq.fused_kernels("0"):
        yield


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = quantize_model(timm.create_model("mini_swin"), QuantConfig.preset("vvtq", 2))
    calibrate(m, [torch.randn(16, 1, 32, 32)])
    return m.eval()


@pytest.fixture
def calls(monkeypatch):
    n = {"linear": 0, "attention": 0}

    def count(key, fn):
        def wrapped(*a, **k):
            n[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(modules, "int_linear", count("linear", modules.int_linear))
    monkeypatch.setattr(attention, "int_attention", count("attention", attention.int_attention))
    return n


def test_eval_without_grad_is_integer_and_matches_fake_quant(model, calls):
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_int = model(x)
        assert calls["linear"] > 0 and calls["attention"] > 0
        seen = dict(calls)
        y_fq = set_integer_eval(model, False)(x)
        set_integer_eval(model, True)
    assert calls == seen  # the switch turns the integer path off
    # the same maths: equal up to float32 rounding (and a rare near-tie code flip)
    assert (y_int - y_fq).abs().max() < 0.05 * (y_fq.max() - y_fq.min())
    assert torch.equal(y_int.argmax(1), y_fq.argmax(1))


def test_training_autograd_and_hooks_keep_the_fake_quant_path(model, calls):
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    y = model(x)  # eval mode, grad enabled: gradients must flow through the fake quantizers
    y.sum().backward()
    assert calls == {"linear": 0, "attention": 0}
    assert any(q.scale.grad is not None for q in iter_act_quantizers(model))
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.train()
        model(x)
        model.eval()
    assert calls == {"linear": 0, "attention": 0}
    # a hook watching a quantizer (statistics collection) must see its input: that layer stays fake-quant
    q = model.layers[0].blocks[0].attn.q_quant
    seen = []
    h = q.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    with torch.no_grad():
        model(x)
    h.remove()
    blocks = sum(len(stage.blocks) for stage in model.layers)
    assert seen and calls["attention"] == blocks - 1  # every other attention block stays integer
