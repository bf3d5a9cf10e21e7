"""``vvtq.export``: a quantized model to its packed file with the spec recorded on it, no metadata dict."""
from __future__ import annotations

import pytest
import torch

import vvtq
from vvtq.export import ExportFormatError, read_packed
from vvtq.export.runtime import build_runtime


def _quantized(**fields):
    torch.manual_seed(0)
    spec = vvtq.ModelSpec("mini_deit", {"depth": 2}, img_size=28, mean=[0.3], std=[0.4], **fields)
    model = vvtq.build_model(spec)
    vvtq.quantize_model(model, vvtq.QuantConfig.preset("vvtq", wbits=2, abits=2))
    x = torch.randn(4, 1, 28, 28)
    vvtq.calibrate(model, [(x, None)], num_batches=1)
    return model.eval(), x


def test_export_writes_the_recorded_spec_and_matches_the_model(tmp_path):
    model, x = _quantized(classes=[str(i) for i in range(10)])
    info = vvtq.export(model, tmp_path / "m.vvtq.safetensors")
    arch = read_packed(info["path"]).header["arch"]
    assert arch["model_kwargs"] == {"depth": 2} and arch["mean"] == [0.3] and arch["classes"][9] == "9"
    assert info["spec"].quant["wbits"] == 2 and info["bytes"] == info["path"].stat().st_size
    with torch.no_grad():
        assert torch.equal(model(x), build_runtime(info["path"])(x))
    assert vvtq.export.export_model is not None and callable(vvtq.export)


def test_save_model_then_load_model(tmp_path):
    model, x = _quantized()
    vvtq.save_model(model, tmp_path / "q.safetensors", step=7)
    again, meta = vvtq.load_model(tmp_path / "q.safetensors")
    assert meta["step"] == 7 and meta["quant"]["wbits"] == 2
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_export_refuses_an_fp_model_and_a_wrong_spec(tmp_path):
    with pytest.raises(ExportFormatError, match="only quantized models"):
        vvtq.export(vvtq.build_model("mini_deit", {"depth": 1}), tmp_path / "fp.vvtq.safetensors")
    model, _ = _quantized()
    with pytest.raises(vvtq.VVTQError, match="does not match its spec"):
        vvtq.export(model, tmp_path / "bad.vvtq.safetensors", spec=vvtq.ModelSpec("mini_deit", {"depth": 3}))
    assert not list(tmp_path.iterdir())


def test_export_records_the_dataset_of_the_spec(tmp_path):
    """The packed file's data section comes from the spec's dataset: no training settings needed."""
    ident = {"name": "fashion_mnist[train-50]", "root": "/data/fm", "split": "train", "data": "fashion_mnist",
             "holdout": 50, "val_split": "holdout"}
    model, _ = _quantized(dataset=ident)
    data = read_packed(vvtq.export(model, tmp_path / "m.vvtq.safetensors")["path"]).header["data"]
    assert data == {"name": "fashion_mnist", "root": "/data/fm", "split": "holdout", "holdout": 50}


def test_reading_a_packed_file_as_a_checkpoint_names_what_it_is(tmp_path):
    model, _ = _quantized()
    path = vvtq.export(model, tmp_path / "m.vvtq.safetensors")["path"]
    with pytest.raises(vvtq.VVTQError, match=r"packed integer export .* `vvtq eval --packed "):
        vvtq.load_model(path)
