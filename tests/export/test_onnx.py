"""QDQ ONNX export: the graph is QuantizeLinear/DequantizeLinear with 8-bit storage and runs in onnxruntime
with the same predictions as the fake-quantized PyTorch model."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from onnx import numpy_helper

import vvtq.models  # noqa: F401
from vvtq.data import EvalDataset, SubsetImageDataset, build_dataset
from vvtq.export.onnx import export_onnx, onnx_ready, run_onnx
from vvtq.quant import QuantConfig, calibrate, quantize_model

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
