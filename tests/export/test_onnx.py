"""QDQ ONNX export: the graph is QuantizeLinear/DequantizeLinear with 8-bit storage and runs in onnxruntime
with the same predictions as the fake-quantized PyTorch model."""
from __future__ import annotations

import copy
import gc
import weakref

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from onnx import numpy_helper
from timm.models import eva
from torch import nn

import vvtq.models  # noqa: F401
from vvtq.data import EvalDataset, SubsetImageDataset, build_dataset
from vvtq.export.onnx import OnnxAttention, export_onnx, onnx_ready, run_onnx
from vvtq.quant import (
    QuantAttention,
    QuantConfig,
    QuantConv2d,
    Quantizer,
    QuantizerError,
    QuantLinear,
    calibrate,
    quantize_model,
    rules,
)

torch.set_num_threads(1)


def _images(split: str, n: int) -> torch.Tensor:
    ds = EvalDataset(SubsetImageDataset(build_dataset("fashion_mnist", split), range(n)), 28)
    return torch.stack([ds[i][0] for i in range(n)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    m = quantize_model(timm.create_model("mini_deit", depth=2), QuantConfig.preset("vvtq", 2))
    calibrate(m, [_images("train", 64)])
    m.eval()
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    info = export_onnx(m, path, 28)
    return m, path, info


def test_onnx_runs_and_agrees(exported):
    m, path, _ = exported
    x = _images("test", 300)
    with torch.no_grad():
        y = m(x)
        assert torch.allclose(onnx_ready(m)(x), y, atol=1e-5)  # the export module computes the same thing
    y_ort = run_onnx(path, x)
    agree = (y_ort.argmax(1) == y.argmax(1)).float().mean().item()
    assert agree >= 0.999, agree
    assert (y_ort - y).abs().max().item() < 0.05 * (y.max() - y.min()).item()
    assert run_onnx(path, x[:3]).shape == (3, 10)  # dynamic batch


def test_graph_is_qdq_with_narrow_ranges(exported):
    m, path, info = exported
    g = onnx.load(str(path))
    ops = [n.op_type for n in g.graph.node]
    assert info["opset"] >= 17 and any(o.domain in ("", "ai.onnx") and o.version >= 17 for o in g.opset_import)
    assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    inits = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
    int8 = [a for a in inits.values() if a.dtype.name == "int8" and a.ndim == 2]
    assert int8 and all(a.min() >= -2 and a.max() <= 1 for a in int8 if a.size == 96 * 96)  # 2-bit codes
    axes = [a.i for n in g.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert 1 in axes  # per-output-channel weight scales ([in, out] storage, axis 1)
    # per-channel weight DQ scales have one entry per output channel of the layer
    assert any(a.ndim == 1 and a.size == 384 and a.dtype.name == "float32" for a in inits.values())


def test_onnx_outputs_do_not_hold_onnxruntime_buffers(exported, monkeypatch):
    """onnxruntime returns arrays that view its session's memory (a capsule base); a tensor that kept such a view
    alive kept ~0.7 GB per call for the mini Swin. ``run_onnx`` must hand back memory of its own."""
    buffers = []

    class Tracked(onnxruntime.InferenceSession):
        def run(self, *args, **kwargs):
            out = super().run(*args, **kwargs)
            owner = np.array(out[0]).view(_Buffer)  # stands in for onnxruntime's buffer
            buffers.append(weakref.ref(owner))
            return [owner[...]]  # a view, as onnxruntime returns

    monkeypatch.setattr(onnxruntime, "InferenceSession", Tracked)
    outputs = [run_onnx(exported[1], _images("test", 4)) for _ in range(2)]
    gc.collect()
    assert len(buffers) == 2 and all(r() is None for r in buffers), "an output still views onnxruntime's memory"
    assert all(o.shape == (4, 10) for o in outputs)


class _Buffer(np.ndarray):
    pass


def spy_on_the_rule_table(monkeypatch) -> list[tuple[str, bool]]:
    """(rule name, quantized walk) of every module the rule table's walker matched, from now on."""
    seen, rule_for = [], rules.rule_for

    def spy(module: nn.Module, quantized: bool = False):
        rule = rule_for(module, quantized)
        if rule is not None:
            seen.append((rule.name, quantized))
        return rule

    monkeypatch.setattr(rules, "rule_for", spy)
    return seen


def refused_by_the_rule_table(model: nn.Module, export) -> tuple[str, str]:
    """The messages of the QAT conversion and of ``export`` for a gated attention block (refused by its rule)."""
    gated = eva.EvaAttention(96, num_heads=3, gated=True, scale_norm=False)
    wrapper, model = nn.Module(), copy.deepcopy(model)
    wrapper.extra = model.extra = gated
    with pytest.raises(QuantizerError) as qat:
        quantize_model(wrapper)
    with pytest.raises(QuantizerError) as exp:
        export(model)
    return str(qat.value), str(exp.value)


def test_the_export_is_the_rule_tables_walk(exported, monkeypatch):
    m = exported[0]
    seen = spy_on_the_rule_table(monkeypatch)
    ready = onnx_ready(m)
    blocks = sum(isinstance(mod, QuantAttention) for mod in m.modules())
    assert seen.count(("converted attention", True)) == blocks == 2 and ("MLP", True) in seen
    assert all(quantized for _, quantized in seen)
    assert sum(isinstance(mod, OnnxAttention) for mod in ready.modules()) == blocks
    left = (QuantAttention, QuantLinear, QuantConv2d, Quantizer)
    assert not [name for name, mod in ready.named_modules() if isinstance(mod, left)]


def test_a_block_the_rule_table_refuses_is_refused_by_the_export(exported):
    qat, export = refused_by_the_rule_table(exported[0], onnx_ready)
    assert export == qat and qat.startswith("extra: gated attention")
