"""The rule table (``vvtq.quant.rules``) and the architectures added through it: SwinV2 and EVA-02.

Tiny configurations of timm's own classes (2 blocks, width 24-48, 28-32 px, one channel): each converts with the
``vvtq`` and ``lsq`` presets, equals the timm model with every quantizer at 32 bits, calibrates and trains a step.
Packed-file agreement is in tests/export/test_runtime.py.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models import eva
from torch import nn

import vvtq.export.runtime as runtime
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
from vvtq.quant.attention import ACT_QUANTIZERS, L2Norm
from vvtq.quant.config import ACT_KINDS, WEIGHT_KINDS

TINY = {
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, window_size=4, embed_dim=24, depths=(2, 2),
                                               num_heads=(2, 4))),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=4, embed_dim=48, depth=2, num_heads=2)),
    # EVA-02 S/B/L style: separate q/k/v projections, SwiGLU with split fc1 and its LayerNorm
    "eva02_split": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=4, embed_dim=48, depth=2, num_heads=2,
                                                   qkv_fused=False, scale_mlp=True)),
}


def tiny(key: str, seed: int = 0, **changes) -> nn.Module:
    """A tiny timm model with a classifier of ordinary scale (timm starts some heads near zero)."""
    name, kwargs = TINY[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=10, **{**kwargs, **changes})
    head = model.head.fc if hasattr(model.head, "fc") else model.head
    nn.init.normal_(head.weight, std=0.5)
    return model


def images(key: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    size = TINY[key][1]["img_size"]
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_rule_table_names_known_kinds_and_one_classifier_list():
    for rule in rules.RULES:
        assert bool(rule.sites) != (rule.attention is not None), rule.name
        for site in rule.sites:
            assert site.kind in WEIGHT_KINDS and site.in_kind in ACT_KINDS, (rule.name, site)
    assert not hasattr(runtime, "_CLASSIFIER_PATHS")  # the runtime walks with the same table


@pytest.mark.parametrize("key", ["swinv2", "eva02", "eva02_split"])
@pytest.mark.parametrize("preset", ["vvtq", "lsq"])
def test_32_bit_conversion_is_the_timm_model(key, preset):
    x = images(key, batch=3)
    ref = tiny(key).eval()
    conv = quantize_model(copy.deepcopy(ref), QuantConfig.preset(preset, 32, 32, edge_bits=32)).eval()
    attn = [m for m in conv.modules() if isinstance(m, QuantAttention)]
    assert len(attn) == 4 if key == "swinv2" else len(attn) == 2
    assert all(a.split == (preset == "vvtq") for a in attn)
    with torch.no_grad():
        y = ref(x)
        assert y.std() > 0.1
        torch.testing.assert_close(conv(x), y, rtol=0, atol=1e-5)


def _train_step(model: nn.Module, x: torch.Tensor) -> set[str]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model.train()(x)
    loss = out.logsumexp(-1).mean() - out[:, 0].mean()
    opt.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


@pytest.mark.parametrize("key", ["swinv2", "eva02"])
@pytest.mark.parametrize("preset", ["vvtq", "lsq"])
def test_convert_calibrate_and_train_one_step(key, preset):
    x = images(key)
    model = quantize_model(tiny(key), QuantConfig.preset(preset, wbits=2, abits=2))
    calibrate(model, [x])
    changed = _train_step(model, x)
    assert any(n.endswith("weight_quant.scale") for n in changed)
    assert any(n.endswith("q_quant.scale") for n in changed)
    if key == "swinv2":  # the float parts learn too
        assert any(n.endswith("attn.logit_scale") for n in changed)
        assert any(".rel_pos.cpb_mlp." in n for n in changed)


def test_swinv2_keeps_cosine_attention_in_float():
    model = quantize_model(tiny("swinv2"), QuantConfig.preset("vvtq", 4))
    attn = model.layers[0].blocks[0].attn
    assert isinstance(attn.q_norm, L2Norm) and isinstance(attn.k_norm, L2Norm)
    assert isinstance(attn.logit_scale, nn.Parameter) and attn.logit_scale.shape == (2, 1, 1)
    assert not any(isinstance(m, QuantLinear) for m in attn.rel_pos.modules())  # the bias MLP stays float
    assert attn.k.bias is None and attn.q.bias is not None and attn.v.bias is not None  # SwinV2's key has no bias
    assert isinstance(model.layers[1].downsample.reduction, QuantLinear)  # SwinV2 patch merging at edge bits
    assert model.layers[1].downsample.reduction.weight_quant.bits == 8


def test_eva02_quantizes_swiglu_and_keeps_rope_in_float():
    model = quantize_model(tiny("eva02_split"), QuantConfig.preset("vvtq", 4))
    mlp, attn = model.blocks[0].mlp, model.blocks[0].attn
    assert all(isinstance(getattr(mlp, n), QuantLinear) for n in ("fc1_g", "fc1_x", "fc2"))
    hidden = mlp.fc2.input_quant  # SiLU(g) * x is signed: no unsigned-with-offset GELU rule here
    assert hidden.signed and hidden.offset is None and hidden.kind == "mlp_hidden"
    assert attn.rope_prefix == 1 and attn.k.bias is None
    # RoPE applied as timm does: one attention block with sharp attention (scaled-up projections), at 32 bits
    src = tiny("eva02_split")
    with torch.no_grad():
        for layer in (src.blocks[0].attn.q_proj, src.blocks[0].attn.k_proj):
            layer.weight.mul_(8)
    rope = src.rope.get_embed()
    tokens = torch.randn(2, 1 + rope.shape[0], 48, generator=torch.Generator().manual_seed(2))
    fp = quantize_model(copy.deepcopy(src), QuantConfig.preset("vvtq", 32, 32, edge_bits=32)).eval()
    with torch.no_grad():
        y = src.blocks[0].attn.eval()(tokens, rope=rope)
        torch.testing.assert_close(fp.blocks[0].attn(tokens, rope=rope), y, rtol=0, atol=1e-5)
        assert (fp.blocks[0].attn(tokens) - y).abs().max() > 1e-2  # without it: another result


def test_unsupported_blocks_are_refused_by_name():
    wrapper = nn.Module()
    wrapper.attn = eva.EvaAttention(48, num_heads=2, gated=True, scale_norm=False)
    with pytest.raises(QuantizerError, match=r"^attn: gated attention \(EvaAttention with a gate\)"):
        quantize_model(wrapper)
    with pytest.raises(QuantizerError, match=r"^blocks\.0\.attn: AttentionRope .* grouped-query"):
        quantize_model(tiny("eva02", attn_type="rope"))


class _Recorder:
    """A factory that records what the walker hands it and replaces nothing but attention (with a marker)."""

    def __init__(self):
        self.layers, self.blocks = {}, {}

    def layer(self, module: nn.Module, path: str, site: rules.Site) -> nn.Module:
        self.layers[path] = module
        return module

    def attention(self, spec, path: str) -> nn.Module:
        self.blocks[path] = spec
        return nn.Identity()


@pytest.mark.parametrize("key", ["swinv2", "eva02_split"])
def test_a_quantized_model_is_walked_by_the_same_table(key):
    """The ONNX exports' walk (``quantized=True``): the table's sites hold the quantized layers, each converted
    attention block is read back with its quantized projections and quantizers (only by this walk)."""
    model = quantize_model(tiny(key), QuantConfig.preset("vvtq", 4))
    attn = {n: m for n, m in model.named_modules() if isinstance(m, QuantAttention)}
    inside = {f"{n}.{c}" for n, m in attn.items() for c, _ in m.named_modules() if c}
    quant = {n: m for n, m in model.named_modules()
             if isinstance(m, (QuantLinear, QuantConv2d)) and n not in inside}
    assert all(rules.rule_for(m) is None and rules.rule_for(m, quantized=True) is rules.CONVERTED
               for m in attn.values())
    seen = _Recorder()
    assert rules.apply_rules(model, seen, quantized=True) == len(attn)
    assert seen.blocks.keys() == attn.keys() and seen.layers.keys() == quant.keys()
    for path, spec in seen.blocks.items():
        assert spec.quantizers == {n: getattr(attn[path], n) for n in ACT_QUANTIZERS}
        assert all(isinstance(layer, QuantLinear) for layer in (*spec.linears.values(), spec.proj))
        assert spec.rel_pos is attn[path].rel_pos and spec.logit_scale is attn[path].logit_scale


def test_a_float_attention_in_a_quantized_walk_is_refused():
    model = quantize_model(tiny("eva02"), QuantConfig.preset("vvtq", 4))
    model.blocks[1].attn = tiny("eva02").blocks[1].attn
    with pytest.raises(QuantizerError, match=r"^blocks\.1\.attn: EvaAttention was not converted"):
        rules.apply_rules(model, _Recorder(), quantized=True)
