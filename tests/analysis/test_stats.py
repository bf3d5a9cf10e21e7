"""Tests for vvtq.analysis.stats: the streaming moments, per-site/per-head statistics and clipping."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

import vvtq
from vvtq.analysis import StreamingMoments, collect_statistics, outlier_heads


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _model(depth: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mini_deit", depth=depth).eval()


def _batches(n: int = 2, b: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, 1, 28, 28, generator=g) for _ in range(n)]


def test_kurtosis_of_gaussian_streamed_in_chunks_is_three():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    m = StreamingMoments(1)
    for chunk in torch.split(x, 123_457):  # uneven chunks
        m.update(chunk.reshape(1, -1).float())
    assert abs(float(m.kurtosis[0]) - 3.0) < 0.05
    assert abs(float(m.std[0]) - 1.0) < 0.01
    u = StreamingMoments(1)  # a uniform sample has kurtosis 1.8: the estimator tells them apart
    u.update(torch.rand(1, 500_000, generator=g))
    assert abs(float(u.kurtosis[0]) - 1.8) < 0.05


def test_streaming_matches_direct_moments_with_large_mean():
    rng = np.random.default_rng(0)
    x = 1000.0 + rng.standard_t(5, size=(3, 20_000))  # heavy tails, mean far from 0
    m = StreamingMoments(3)
    for i in range(0, x.shape[1], 3_001):
        m.update(torch.from_numpy(x[:, i:i + 3_001]))
    d = x - x.mean(axis=1, keepdims=True)
    var = (d ** 2).mean(axis=1)
    np.testing.assert_allclose(m.mean.numpy(), x.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(m.std.numpy(), np.sqrt(var), rtol=1e-9)
    np.testing.assert_allclose(m.kurtosis.numpy(), (d ** 4).mean(axis=1) / var ** 2, rtol=1e-7)
    np.testing.assert_allclose(m.outlier_ratio.numpy(), np.abs(d).max(axis=1) / np.sqrt(var), rtol=1e-9)
    whole = StreamingMoments(1)
    whole.update(torch.from_numpy(x.reshape(1, -1)))
    pooled = m.merged()
    for attr in ("mean", "std", "kurtosis", "outlier_ratio"):
        np.testing.assert_allclose(getattr(pooled, attr).numpy(), getattr(whole, attr).numpy(), rtol=1e-8)


def test_fp_model_statistics_cover_every_site_and_leave_the_model_alone():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = collect_statistics(model, _batches(), ref_bits=2)
    kinds = {(r["tensor"], r["kind"]) for r in stats.rows()}
    for kind in ("q", "k", "v", "proj", "fc1", "fc2"):
        assert ("weight", kind) in kinds
    for kind in ("attn_in", "q_act", "k_act", "v_act", "attn_prob", "attn_out", "mlp_in", "mlp_hidden"):
        assert ("act", kind) in kinds
    assert not hasattr(model, "vvtq_config")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    prob = stats.sites["blocks.0.attn.attn_quant"]
    assert prob.heads == 3 and prob.total.n.item() == 2 * 8 * 3 * 50 * 50
    assert abs(prob.total.mean.item() - 1 / 50) < 1e-6  # softmax rows sum to 1 over 50 tokens
    for r in stats.rows():
        assert math.isfinite(r["kurtosis"]) and 0.0 <= r["clip_frac"] <= 1.0


def test_planted_outlier_head_in_weights_stands_out():
    model = _model()
    clean = outlier_heads(collect_statistics(model, activations=False), top=1)[0]
    assert clean["score"] < 2.0
    hd = 96 // 3
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[hd:2 * hd] *= 6.0  # the q rows of head 1
    top = outlier_heads(collect_statistics(model, activations=False), top=3)
    assert (top[0]["site"], top[0]["head"]) == ("blocks.0.attn.q.weight_quant", 1)
    assert top[0]["std_ratio"] > 4.0 and top[1]["score"] < 2.0


def test_planted_outlier_head_in_activations_stands_out():
    model = vvtq.quantize_model(_model(), vvtq.QuantConfig.preset("vvtq", wbits=32, abits=32, edge_bits=32))
    hd = 96 // 3

    def spike(module, args, out):
        out = out.clone()
        out[:, 0, 2 * hd + 5] += 40.0  # one channel of head 2, on the class token
        return out

    model.blocks[0].attn.q.register_forward_hook(spike)
    stats = collect_statistics(model, _batches())
    top = outlier_heads(stats, top=1)[0]
    assert (top["site"], top["head"]) == ("blocks.0.attn.q_quant", 2)
    _layers, m = stats.head_matrix("kurtosis", "q_act")
    assert m[0][2] > 3 * max(m[0][0], m[0][1])


def test_clip_fraction_uses_the_learned_scales():
    model = vvtq.quantize_model(_model(), vvtq.QuantConfig.preset("vvtq", wbits=2, abits=2))
    vvtq.calibrate(model, _batches(1))
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight_quant.scale.mul_(0.5)
    stats = collect_statistics(model, _batches(1))
    layer = model.blocks[0].mlp.fc1
    q = layer.weight_quant
    v = layer.weight.detach() / q.expanded_scale(layer.weight)
    expected = float(((v < q.qmin) | (v > q.qmax)).double().mean())
    row = stats.sites["blocks.0.mlp.fc1.weight_quant"].row()
    assert row["scale"] == "learned" and row["clip_frac"] == pytest.approx(expected, abs=1e-9)
    assert 0.0 < row["clip_frac"] < 1.0
    act = stats.sites["blocks.0.mlp.fc2.input_quant"].row()
    assert act["scale"] == "learned" and 0.0 <= act["clip_frac"] < 0.5
