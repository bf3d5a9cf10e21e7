"""Fast ONNX export: onnxruntime runs every quantized matmul on integer kernels (as it reports after optimisation)
and predicts what the integer reference runtime predicts."""
from __future__ import annotations

import collections

import onnx
import onnxruntime
import pytest
import timm
import torch
from onnx import numpy_helper
from test_onnx import refused_by_the_rule_table, spy_on_the_rule_table

import vvtq.models  # noqa: F401
from vvtq.data import EvalDataset, SubsetImageDataset, build_dataset
from vvtq.export import write_packed
from vvtq.export.onnx import export_onnx, run_onnx
from vvtq.export.onnx_fast import FastAttention, FastExportError, fast_ready
from vvtq.export.runtime import build_runtime, run_packed
from vvtq.quant import QuantAttention, QuantConfig, QuantConv2d, Quantizer, QuantLinear, calibrate, quantize_model
from vvtq.spec import ModelSpec

torch.set_num_threads(1)
FLOAT_MATMULS = {"MatMul", "FusedMatMul", "Gemm", "Conv", "DequantizeLinear"}
CASES = {  # name: (architecture, kwargs, image size, preset, bits)
    "deit_vvtq_w2": ("mini_deit", {"depth": 1}, 28, "vvtq", 2),
    "swin_lsq_w4": ("mini_swin", {"depths": (1, 1), "num_heads": (2, 4)}, 32, "lsq", 4),
}


def _images(split: str, n: int, img: int) -> torch.Tensor:
    ds = EvalDataset(SubsetImageDataset(build_dataset("fashion_mnist", split), range(n)), img)
    return torch.stack([ds[i][0] for i in range(n)])


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    arch, kwargs, img, preset, bits = CASES[request.param]
    torch.manual_seed(0)
    m = quantize_model(timm.create_model(arch, **kwargs), QuantConfig.preset(preset, bits))
    calibrate(m, [_images("train", 48, img)])
    m.eval()
    tmp = tmp_path_factory.mktemp(request.param)
    meta = ModelSpec(arch, model_kwargs=kwargs, img_size=img, mean=[0.286], std=[0.353],
                     quant=m.vvtq_config.to_dict()).to_dict()
    write_packed(m, meta, tmp / "m.vvtq.safetensors")
    info = export_onnx(m, tmp / "m.onnx", img, mode="fast")
    return {"model": m, "img": img, "info": info, "packed": tmp / "m.vvtq.safetensors", "tmp": tmp,
            "preset": preset, "bits": bits}


def _optimized_ops(path, tmp) -> collections.Counter:
    opts = onnxruntime.SessionOptions()
    opts.optimized_model_filepath = str(tmp / "optimized.onnx")
    onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


def test_fast_onnx_agrees_with_the_integer_runtime(exported):
    x = _images("test", 200, exported["img"])
    y_rt = run_packed(build_runtime(exported["packed"]), x)
    y_onnx = run_onnx(exported["info"]["path"], x)
    agree = (y_onnx.argmax(1) == y_rt.argmax(1)).float().mean().item()
    assert agree >= 0.995, agree
    # a code flipped at a threshold moves a logit by a fraction of its range; a wrong formula moves all of them
    diff = (y_onnx - y_rt).abs()
    assert diff.median().item() < 1e-4 and diff.max().item() < 0.2 * (y_rt.max() - y_rt.min()).item()
    with torch.no_grad():  # the export modules compute the same thing in PyTorch
        assert (fast_ready(exported["model"])(x).argmax(1) == y_rt.argmax(1)).float().mean() >= 0.995
    assert run_onnx(exported["info"]["path"], x[:3]).shape == (3, 10)  # dynamic batch


def test_onnxruntime_runs_integer_kernels_only(exported):
    """What onnxruntime runs after optimisation: every matmul is MatMulIntegerToFloat, none is a float matmul,
    and nothing is dequantized back to float."""
    ops = _optimized_ops(exported["info"]["path"], exported["tmp"])
    assert not FLOAT_MATMULS & set(ops), ops
    m = exported["model"]
    linears = sum(type(mod).__name__ in ("QuantLinear", "QuantConv2d") for mod in m.modules())
    attentions = sum(type(mod).__name__ == "QuantAttention" for mod in m.modules())
    # one per linear (per head for a per-head input quantizer, the output projection), two per attention
    heads = sum(mod.num_heads - 1 for mod in m.modules() if type(mod).__name__ == "QuantAttention"
                and mod.proj.input_quant.num_groups > 1)
    assert ops["MatMulIntegerToFloat"] == linears + 2 * attentions + heads, ops
    assert ops["QuantizeLinear"] >= linears


def test_codes_are_int8_weights_in_their_narrow_range(exported):
    g = onnx.load(exported["info"]["path"])
    assert exported["info"]["opset"] == 21 and exported["info"]["mode"] == "fast"
    assert any(p.key == "vvtq.onnx_mode" and p.value == "fast" for p in g.metadata_props)
    inits = [numpy_helper.to_array(t) for t in g.graph.initializer]
    codes = [a for a in inits if a.dtype.name == "int8" and a.ndim == 2 and a.shape[0] > 8]
    lo, hi = -(1 << (exported["bits"] - 1)), (1 << (exported["bits"] - 1)) - 1
    low_bit = [a for a in codes if a.min() >= -128 and a.max() <= hi and a.min() >= lo]
    assert low_bit and len(low_bit) >= len(codes) - 3  # all but the 8-bit edges (patch embed, merge, head)
    assert all(a.dtype.name == "float32" for a in inits if a.dtype.kind == "f")


def test_unsupported_layers_are_refused_with_the_exact_mode_named(tmp_path):
    m = quantize_model(timm.create_model("mini_deit", depth=1), QuantConfig.preset("lsq", 4, 32))
    calibrate(m, [torch.randn(8, 1, 28, 28)])
    with pytest.raises(FastExportError, match="mode qdq"):
        export_onnx(m.eval(), tmp_path / "w4a32.onnx", 28, mode="fast")
    export_onnx(m, tmp_path / "w4a32_qdq.onnx", 28, mode="qdq")  # the exact export still covers it
    with pytest.raises(ValueError, match="mode"):
        export_onnx(m, tmp_path / "x.onnx", 28, mode="int4")


@pytest.mark.parametrize(("name", "kwargs", "img", "what"), [
    ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=4, embed_dim=48, depth=1, num_heads=2), 28,
     "rotary position embedding"),
    ("swinv2_tiny_window8_256", dict(img_size=32, window_size=4, embed_dim=24, depths=(2,), num_heads=(2,)), 32,
     "no fast form"),
])
def test_attention_the_fast_form_cannot_express_is_refused(tmp_path, name, kwargs, img, what):
    """EVA-02's RoPE and SwinV2's cosine attention are refused by name, never exported wrongly."""
    m = timm.create_model(name, pretrained=False, in_chans=1, num_classes=10, **kwargs)
    quantize_model(m, QuantConfig.preset("vvtq", 4, 4))
    calibrate(m, [torch.randn(4, 1, img, img)])
    with pytest.raises(FastExportError, match=what):
        export_onnx(m.eval(), tmp_path / "m.onnx", img, mode="fast")


def test_the_fast_export_is_the_rule_tables_walk(exported, monkeypatch):
    m = exported["model"]
    seen = spy_on_the_rule_table(monkeypatch)
    ready = fast_ready(m)
    blocks = sum(isinstance(mod, QuantAttention) for mod in m.modules())
    assert seen.count(("converted attention", True)) == blocks > 0 and all(quantized for _, quantized in seen)
    assert sum(isinstance(mod, FastAttention) for mod in ready.modules()) == blocks
    left = (QuantAttention, QuantLinear, QuantConv2d, Quantizer)
    assert not [name for name, mod in ready.named_modules() if isinstance(mod, left)]
    qat, export = refused_by_the_rule_table(m, fast_ready)  # a block the rule table refuses: the same message
    assert export == qat and qat.startswith("extra: gated attention")
