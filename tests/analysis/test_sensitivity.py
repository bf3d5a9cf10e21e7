"""Tests for vvtq.analysis.sensitivity: one group quantized at a time, drops and KL to FP."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vvtq
from vvtq.analysis import block_groups, kind_groups, module_groups, requantize, run_sensitivity
from vvtq.quant import Quantizer


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mini_deit", depth=2).eval()


def _batches(n: int = 3, b: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g))
            for _ in range(n)]


def test_groups_name_the_converted_sites():
    model = _model()
    kinds = kind_groups(model)
    assert kinds["q"] == ["blocks.0.attn.q.weight_quant", "blocks.1.attn.q.weight_quant"]
    assert kinds["attn_prob"] == ["blocks.0.attn.attn_quant", "blocks.1.attn.attn_quant"]
    assert "patch_embed" not in kinds and "head" not in kinds
    assert set(block_groups(model)) == {"blocks.0", "blocks.1"}
    assert module_groups(model)["blocks.1.mlp.fc2"] == ["blocks.1.mlp.fc2.weight_quant"]
    assert len(module_groups(model)) == 12


def test_ptq_sensitivity_is_finite_and_zero_at_32_bits():
    model, evalb = _model(), _batches()
    groups = {**kind_groups(model), **block_groups(model)}
    ref, res = run_sensitivity(model, evalb, groups, bits=2, calib_batches=evalb[:1], include_all=True)
    fp_logits = torch.cat([model(x) for x, _ in evalb])
    labels = torch.cat([y for _, y in evalb])
    assert ref["acc"] == pytest.approx(100.0 * float((fp_logits.argmax(1) == labels).float().mean()))
    assert {r.label for r in res} == set(groups) | {"all"}
    for r in res:
        assert math.isfinite(r.drop) and math.isfinite(r.kl) and r.kl >= -1e-9 and r.bits == 2
    assert max(r.kl for r in res) > 1e-3
    assert res[-1].label == "all" and res[-1].kl == max(r.kl for r in res)
    _ref, res32 = run_sensitivity(model, evalb, groups, bits=32, calib_batches=evalb[:1], include_all=True)
    for r in res32:
        assert r.drop == 0.0 and abs(r.kl) < 1e-9


def test_learned_mode_uses_the_checkpoint_quantizers():
    model = vvtq.quantize_model(_model(), vvtq.QuantConfig.preset("vvtq", wbits=3, abits=3))
    evalb = _batches()
    vvtq.calibrate(model, [x for x, _ in evalb[:1]])
    _ref, res = run_sensitivity(model, evalb, kind_groups(model), mode="learned", include_all=True)
    quant = torch.cat([model(x) for x, _ in evalb])
    vvtq.set_quantization_enabled(model, False)
    fp = torch.cat([model(x) for x, _ in evalb])
    vvtq.set_quantization_enabled(model, True)
    expected = F.kl_div(quant.log_softmax(-1), fp.log_softmax(-1), log_target=True, reduction="batchmean")
    assert res[-1].label == "all" and res[-1].kl == pytest.approx(float(expected.detach()), rel=1e-4)
    assert all(r.bits == 3 for r in res)
    assert all(m.enabled for m in model.modules() if isinstance(m, Quantizer))  # the model is left as it was


def test_requantize_rebuilds_sites_at_the_requested_bits():
    model = _model()
    qm = requantize(model, lambda name, q: 4 if q.kind == "fc1" else 32)
    for name, q in qm.named_modules():
        if isinstance(q, Quantizer):
            assert q.name == name and q.bits == (4 if q.kind == "fc1" else 32)
            assert not bool(q.initialized)
    assert qm.blocks[0].attn.q.weight_quant.num_groups == 96
