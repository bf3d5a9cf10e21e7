"""The rule table's Hugging Face part (``vvtq.quant.rules_hf``): ViT, DeiT (with and without its teacher head),
Swin and DINOv2 (MLP and SwiGLU) from ``transformers``, tiny random-init configs (width 16-32, 2 layers, 32 px).

Each converts with the same quantizers as the timm blocks, equals the HF model with every quantizer at 32 bits,
keeps W8 logits within cosine 0.999 of FP, computes the same thing whether HF loaded it with eager attention or
SDPA, and runs in the integer runtime with the model's logits, bit for bit. Refusals are one line.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hf_models import FAMILIES, images, tiny, tiny_hf  # noqa: I001  (tests/ helper; skips without transformers)
from vvtq.export.runtime import IntAttention, build_runtime, run_packed
from vvtq.hf import HFClassifier
from vvtq.quant import (
    QuantAttention,
    QuantConfig,
    QuantConv2d,
    QuantizerError,
    QuantLinear,
    calibrate,
    quantize_model,
    rules,
)
from vvtq.quant.rules_hf import HF_RULES, HFAttention
from vvtq.spec import ModelSpec

LAYERS = {"vit": 2, "deit": 2, "deit_teacher": 2, "swin": 3, "dinov2": 2, "dinov2_swiglu": 2}


def quantized(family: str, cfg: QuantConfig, attn: str = "eager", seed: int = 0) -> tuple:
    fp = tiny(family, seed, attn)
    x = images(8)
    with torch.no_grad():
        ref = fp(x)
    m = quantize_model(fp, cfg)
    calibrate(m, [images(16, seed=2)])
    return m.eval(), x, ref


def test_transformers_is_imported_only_for_its_models():
    code = ("import sys, timm, vvtq, vvtq.quant, vvtq.export.runtime; "
            "m = vvtq.quantize_model(timm.create_model('mini_deit', depth=1)); "
            "assert 'transformers' not in sys.modules and 'vvtq.quant.rules_hf' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_hf_rules_name_known_kinds_and_join_the_one_table():
    from vvtq.quant.config import ACT_KINDS, WEIGHT_KINDS

    for rule in HF_RULES:
        assert bool(rule.sites) != (rule.attention is not None), rule.name
        assert (rule.adapter is not None) == (rule.attention is not None), rule.name
        for site in rule.sites:
            assert site.kind in WEIGHT_KINDS and site.in_kind in ACT_KINDS, (rule.name, site)
    src = tiny_hf("vit")
    assert rules.rule_for(src.vit.layers[0].attention).name.startswith("HF ViT")
    assert rules.rule_for(src.vit.layers[0].mlp).name == "HF MLP"


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_places_the_timm_quantizers(family):
    m, _, _ = quantized(family, QuantConfig.preset("vvtq", 2))
    attn = [a for a in m.modules() if isinstance(a, HFAttention)]
    assert len(attn) == LAYERS[family] and all(isinstance(a.core, QuantAttention) and a.core.split for a in attn)
    core = attn[0].core
    assert core.attn_quant.bits == 2 and not core.attn_quant.signed and core.q_quant.granularity == "head"
    conv = [c for c in m.modules() if isinstance(c, QuantConv2d)]
    assert len(conv) == 1 and conv[0].weight_quant.bits == 8 and conv[0].weight_quant.kind == "patch_embed"
    heads = [n for n, q in m.named_modules() if isinstance(q, QuantLinear) and q.weight_quant.kind == "head"]
    assert len(heads) == (2 if family == "deit_teacher" else 1)
    kinds = {q.weight_quant.kind for q in m.modules() if isinstance(q, QuantLinear)}
    assert {"q", "k", "v", "proj", "fc1", "fc2", "head"} <= kinds
    assert ("merge" in kinds) == (family == "swin")
    hidden = [q.input_quant for q in m.modules() if isinstance(q, QuantLinear) and q.weight_quant.kind == "fc2"]
    swiglu = family == "dinov2_swiglu"
    assert all(q.signed == swiglu and (q.offset is None) == swiglu for q in hidden)  # GELU output: unsigned


@pytest.mark.parametrize("family", FAMILIES)
def test_at_32_bits_the_quantized_model_is_the_hf_model(family):
    m, x, ref = quantized(family, QuantConfig.preset("vvtq", 32, 32, edge_bits=32))
    with torch.no_grad():
        y = m(x)
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5), (y - ref).abs().max()


@pytest.mark.parametrize("family", ["vit", "deit_teacher", "swin", "dinov2"])
def test_w8_logits_match_fp(family):
    m, x, ref = quantized(family, QuantConfig.preset("vvtq", 8, 8, edge_bits=8))
    with torch.no_grad():
        y = m(x)
    cos = F.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.999, cos


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_eager_and_sdpa_models_quantize_to_the_same_explicit_attention(family, monkeypatch):
    cfg = QuantConfig.preset("vvtq", 4)
    eager, x, ref_eager = quantized(family, cfg, "eager")
    sdpa, _, ref_sdpa = quantized(family, cfg, "sdpa")
    assert sdpa.hf.config._attn_implementation == "sdpa"
    assert torch.allclose(ref_eager, ref_sdpa, atol=1e-5)
    from transformers import modeling_utils

    def refuse(*args, **kwargs):
        raise AssertionError("the HF attention interface was called")

    monkeypatch.setattr(modeling_utils.ALL_ATTENTION_FUNCTIONS, "get_interface", refuse)
    with torch.no_grad():
        assert torch.equal(eager(x), sdpa(x))


def test_training_steps_lower_the_loss_at_w2a2():
    torch.manual_seed(0)
    m, _, _ = quantized("vit", QuantConfig.preset("vvtq", 2))
    x, y = images(32, seed=3), torch.arange(32) % 10
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    m.train()
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("family", FAMILIES)
def test_integer_runtime_gives_the_models_logits(family, tmp_path):
    import vvtq

    m, x, _ = quantized(family, QuantConfig.preset("vvtq", 3))
    m.vvtq_spec = ModelSpec.of(m)
    path = tmp_path / "m.vvtq.safetensors"
    vvtq.export(m, path)
    rt = build_runtime(path)
    assert sum(isinstance(a, IntAttention) for a in rt.modules()) == LAYERS[family]
    with torch.no_grad():
        assert torch.equal(run_packed(rt, x), m(x))


def test_an_unsupported_activation_is_refused_in_one_line():
    model = HFClassifier(tiny_hf("vit", hidden_act="tanh"))
    with pytest.raises(QuantizerError, match=r"ViTMLP: its activation Tanh has no quantization rule") as err:
        quantize_model(model)
    assert "\n" not in str(err.value)


def test_a_mask_that_is_not_a_tensor_is_refused():
    m, x, _ = quantized("vit", QuantConfig.preset("vvtq", 4))
    attn = m.hf.vit.layers[0].attention
    with pytest.raises(QuantizerError, match="ViTAttention: vvtq's quantized attention takes a tensor mask"):
        attn(torch.randn(2, 5, 32), attention_mask=object())
    out, weights = attn(torch.randn(2, 5, 32), torch.zeros(2, 1, 5, 5))  # HF's call and return structure
    assert out.shape == (2, 5, 32) and weights is None


def test_an_hf_attention_left_in_a_quantized_model_is_refused_by_the_export():
    from vvtq.export.onnx import onnx_ready

    m, _, _ = quantized("vit", QuantConfig.preset("vvtq", 4))
    m.hf.vit.layers[1].attention = tiny_hf("vit").vit.layers[1].attention
    with pytest.raises(QuantizerError, match=r"hf\.vit\.layers\.1\.attention: ViTAttention was not converted"):
        onnx_ready(m)
