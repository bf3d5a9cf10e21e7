"""The integer reference runtime agrees with the fake-quantized PyTorch model (mini DeiT / Swin, W2A2 / W4A4;
tiny SwinV2 and EVA-02 with both presets, after a training step).

Models are calibrated on a few Fashion-MNIST training batches (no QAT steps, to stay fast) and compared on the
first test images:
- the float32 runtime against the model as it evaluates (eval mode, no grad: integer domain): identical logits;
- the float64 runtime against the plain fake-quant model in float64 (``float64_reference``: ``x_hat @ W_hat^T``,
  the other formula): logits within 1e-9, so the integer formulas are the fake-quant maths;
- predictions against the plain fake-quant model in float32 (rounding alone may flip a rare near-tie code).
"""
from __future__ import annotations

import pytest
import timm
import torch

import vvtq.models  # noqa: F401
from vvtq.data import EvalDataset, SubsetImageDataset, build_dataset
from vvtq.export import write_packed
from vvtq.export.runtime import IntAttention, IntLinear, build_runtime, float64_reference, run_packed
from vvtq.quant import QuantConfig, calibrate, quantize_model
from vvtq.quant.modules import set_integer_eval
from vvtq.spec import ModelSpec

torch.set_num_threads(1)


def _images(split: str, n: int, img: int, start: int = 0) -> torch.Tensor:
    base = build_dataset("fashion_mnist", split)
    ds = EvalDataset(SubsetImageDataset(base, range(start, start + n)), img)
    return torch.stack([ds[i][0] for i in range(n)])


@pytest.fixture(scope="module")
def data():
    out = {}
    for img in (28, 32):
        out[img] = (_images("train", 64, img), _images("test", 128, img))
    return out


# tiny SwinV2 (cosine attention, continuous position bias, post-norm) and EVA-02 (RoPE, SwiGLU; fused and
# separate q/k/v) from timm's own classes, recorded in the file as model name + kwargs
TINY = {
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, window_size=4, embed_dim=24, depths=[2, 2],
                                               num_heads=[2, 4], in_chans=1, num_classes=10)),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=4, embed_dim=48, depth=2, num_heads=2,
                                             in_chans=1, num_classes=10)),
    "eva02_split": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=4, embed_dim=48, depth=2, num_heads=2,
                                                   in_chans=1, num_classes=10, qkv_fused=False, scale_mlp=True)),
}


def _train_step(m: torch.nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    out = m.train()(x)
    (out.logsumexp(-1).mean() - out[:, 0].mean()).backward()
    opt.step()


def _check(name: str, cfg: QuantConfig, data, tmp_path, n: int, train: bool = False) -> dict:
    name, kwargs = TINY.get(name, (name, {}))
    img = kwargs.get("img_size", 28 if name == "mini_deit" else 32)
    calib, test = data[img][0], data[img][1][:n]
    torch.manual_seed(0)
    m = timm.create_model(name, **kwargs)
    if kwargs:  # timm starts these heads near zero: give the logits an ordinary scale
        head = m.head.fc if hasattr(m.head, "fc") else m.head
        torch.nn.init.normal_(head.weight, std=0.5)
    m = quantize_model(m, cfg)
    calibrate(m, [calib[:32], calib[32:]])
    if train:
        _train_step(m, calib[:16])
    m.eval()
    meta = ModelSpec(name, model_kwargs=kwargs, img_size=img, mean=[0.286], std=[0.353],
                     quant=cfg.to_dict()).to_dict()
    path = tmp_path / f"{name}.vvtq.safetensors"
    write_packed(m, meta, path)
    rt = build_runtime(path)
    assert any(isinstance(mod, IntAttention) for mod in rt.modules())
    assert not any(type(mod).__name__.startswith("Quant") for mod in rt.modules())  # no training modules
    y_rt = run_packed(rt, test)
    assert y_rt.dtype == torch.float32
    with torch.no_grad():
        y32 = m(test)
        y_plain = set_integer_eval(m, False)(test)
        set_integer_eval(m, True)
    assert torch.equal(y_rt, y32)  # bit for bit: the same integer-domain code on the same codes and scales
    y_rt64 = run_packed(build_runtime(path, dtype=torch.float64), test)
    with torch.no_grad():
        y64 = float64_reference(m)(test.double())
    diff = (y_rt64 - y64).abs().max().item()
    assert (y_rt64.argmax(1) == y64.argmax(1)).all()
    assert diff < 1e-9, diff
    assert (y_rt.argmax(1) == y_plain.argmax(1)).float().mean() >= 0.98
    return {"rt": rt, "model": m, "diff": diff}


@pytest.mark.parametrize("name,bits,n", [("mini_deit", 2, 128), ("mini_deit", 4, 48), ("mini_swin", 2, 64),
                                         ("mini_swin", 4, 32)])
def test_runtime_matches_fake_quant(name, bits, n, data, tmp_path):
    _check(name, QuantConfig.preset("vvtq", bits), data, tmp_path, n)


@pytest.mark.parametrize("preset", ["vvtq", "lsq"])
@pytest.mark.parametrize("name", ["swinv2", "eva02", "eva02_split"])
def test_runtime_matches_swinv2_and_eva02(name, preset, data, tmp_path):
    out = _check(name, QuantConfig.preset(preset, 2), data, tmp_path, 32, train=True)
    attn = [a for a in out["rt"].modules() if isinstance(a, IntAttention)]
    assert attn and all(a.split == (preset == "vvtq") for a in attn)
    if name == "swinv2":  # the float parts of cosine attention came from the file
        src = out["model"].layers[0].blocks[0].attn
        assert torch.equal(attn[0].logit_scale, src.logit_scale.detach())
        assert torch.equal(attn[0].rel_pos.cpb_mlp[0].weight, src.rel_pos.cpb_mlp[0].weight.detach())
    if name == "eva02" and preset == "lsq":  # bias-free fused qkv: the q / v biases travel as FP tensors
        assert torch.equal(attn[0].v_bias, out["model"].blocks[0].attn.v_bias.detach())


def test_fused_attention_path_and_lsq_preset(data, tmp_path):
    # softmax-output quantizer off: training runs scaled_dot_product_attention on the quantized q, k, v
    cfg = QuantConfig.preset("vvtq", 2, overrides={"*.attn_quant": {"abits": 32}})
    out = _check("mini_deit", cfg, data, tmp_path, 32)
    assert all(a.attn_quant is None for a in out["rt"].modules() if isinstance(a, IntAttention))
    # the plain LSQ baseline: fused qkv, per-tensor scales, signed GELU output without offset
    out = _check("mini_swin", QuantConfig.preset("lsq", 3), data, tmp_path, 24)
    assert any(hasattr(a, "qkv") for a in out["rt"].modules() if isinstance(a, IntAttention))


def test_int_linear_accumulates_integers(data, tmp_path):
    """One layer by hand: y = s_w[o] * s_x * (C_x @ C_w^T) + b, with integer-valued accumulators."""
    out = _check("mini_deit", QuantConfig.preset("vvtq", 2), data, tmp_path, 8)
    layer: IntLinear = out["rt"].blocks[1].mlp.fc1
    src = out["model"].blocks[1].mlp.fc1
    x = torch.randn(5, 96)
    qx = layer.input_quant(x)
    assert torch.equal(qx.codes, qx.codes.round()) and qx.codes.abs().max() <= 2
    assert torch.equal(layer.weight_codes, src.weight_quant.codes(src.weight).float())
    acc = qx.codes.double() @ layer.weight_codes.double().t()
    assert torch.equal(acc, acc.round())
    want = acc * qx.scale.double() * layer.weight_quant.scale.double() + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-6, atol=1e-6)


def test_runtime_dtype_is_checked(data, tmp_path):
    out = _check("mini_deit", QuantConfig.preset("vvtq", 2), data, tmp_path, 4)
    path = tmp_path / "mini_deit.vvtq.safetensors"
    with pytest.raises(ValueError, match="float32 or float64"):
        build_runtime(path, dtype=torch.float16)
    assert next(out["rt"].parameters()).dtype == torch.float32
