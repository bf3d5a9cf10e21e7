"""Hugging Face models through the whole path: a ``save_pretrained`` folder loaded by ``vvtq.load_model`` and as
the loop's ``model``, QAT with the loop, checkpoint -> load_model -> eval (without the folder), packed export and
the integer runtime (the model's logits, bit for bit), both ONNX modes against the runtime, ``vvtq analyze``.
Tiny random-init configs (hf_models.py) and a tiny image folder; no download."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import vvtq
from fakes import write_image_folder
from hf_models import images, tiny_config, tiny_hf  # tests/ helper; skips without transformers
from vvtq.cli import main
from vvtq.errors import ConfigError
from vvtq.export.runtime import build_runtime, run_packed
from vvtq.hf import HFClassifier


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny ViT (3 classes), a 32 px RGB image folder with 3 classes and a short W2A2 loop run on it."""
    from vvtq.train import TrainConfig, train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hf")
    write_image_folder(root / "data", {"train": 48, "test": 12}, 32)
    hf = tiny_hf("vit", num_labels=3)
    hf.save_pretrained(root / "vit")
    cfg = TrainConfig.from_yaml("mini_deit_w2a2_vvtq", [
        f"model={root / 'vit'}", "data=image_folder", f"data_root={root / 'data'}", "img_size=32",
        "init_from=null", "batch_size=16", "epochs=3", "calib_batches=1", "warmup_epochs=0", "progress=false",
        "crop_scale=[0.9, 1.0]", f"out={root / 'run'}"])
    metrics = train(cfg)
    return root, metrics


def test_load_model_reads_a_saved_folder_and_an_hf_id(setup):
    root, _ = setup
    ref = tiny_hf("vit", num_labels=3)
    x = images(4)
    for source in (root / "vit", str(root / "vit"), f"hf:{root / 'vit'}"):
        model, meta = vvtq.load_model(source)
        assert isinstance(model, HFClassifier) and not model.training
        with torch.no_grad():
            assert torch.allclose(model(x), ref(pixel_values=x).logits, atol=1e-5)  # sdpa here, eager there
        assert meta["img_size"] == 32 and meta["model_kwargs"]["hf"]["class"] == "ViTForImageClassification"
        assert meta["model_kwargs"]["hf"]["config"]["hidden_size"] == 32


def test_model_kwargs_set_the_config_and_a_mistyped_one_is_one_error(setup):
    root, _ = setup
    model = vvtq.build_model(str(root / "vit"), {"num_classes": 5})
    assert model.hf.config.num_labels == 5 and model(images(2)).shape == (2, 5)
    with pytest.raises(ConfigError, match="ViTConfig has no setting 'no_such_key'"):
        vvtq.build_model(str(root / "vit"), {"no_such_key": 1})


def test_the_loop_trains_a_folder_model_at_w2a2(setup):
    root, metrics = setup
    epochs = [h["train_loss"] for h in metrics["history"] if h.get("type") == "epoch"]
    assert metrics["step"] == 9 and len(epochs) == 3 and epochs[-1] < epochs[0], epochs
    assert metrics["final_acc"] >= 0
    meta = vvtq.checkpoint.read_meta(root / "run" / "last.safetensors")
    assert meta["model"] == str(root / "vit") and meta["quant"]["wbits"] == 2
    assert len(meta["model_kwargs"]["hf"]["config"]["id2label"]) == 3


def test_checkpoint_loads_evaluates_and_exports_without_the_folder(setup, tmp_path):
    root, _ = setup
    ckpt = tmp_path / "last.safetensors"
    shutil.copy(root / "run" / "last.safetensors", ckpt)
    moved = root / "vit_moved"
    (root / "vit").rename(moved)  # the checkpoint alone rebuilds the model
    try:
        model, meta = vvtq.load_model(ckpt)
        assert model.vvtq_config.wbits == 2
        x = images(6)
        packed = tmp_path / "m.vvtq.safetensors"
        vvtq.export(model, packed)
        rt = build_runtime(packed)
        with torch.no_grad():
            assert torch.equal(run_packed(rt, x), model(x))
        assert main(["eval", "--checkpoint", str(ckpt), "--limit", "12"]) == 0
        assert main(["eval", "--packed", str(packed), "--limit", "12"]) == 0
    finally:
        moved.rename(root / "vit")


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_onnx_modes_agree_with_the_runtime(family, tmp_path):
    pytest.importorskip("onnxruntime")
    from vvtq.export.onnx import export_onnx, run_onnx

    torch.manual_seed(0)
    model = HFClassifier(tiny_hf(family))
    vvtq.quantize_model(model, vvtq.QuantConfig.preset("vvtq", 4))
    vvtq.calibrate(model, [images(16, seed=2)])
    model.eval()
    packed = tmp_path / "m.vvtq.safetensors"
    vvtq.export(model, packed)
    x = images(16, seed=5)
    y_rt = run_packed(build_runtime(packed), x)
    for mode, tol in (("qdq", 1e-3), ("fast", None)):
        path = tmp_path / f"{mode}.onnx"
        export_onnx(model, path, 32, mode=mode)
        y = run_onnx(path, x)
        agree = (y.argmax(1) == y_rt.argmax(1)).float().mean().item()
        assert agree >= 0.9, (mode, agree)
        if tol is not None:
            assert (y - y_rt).abs().max().item() < tol, mode


def _analyze(checkpoint: Path, out: Path) -> dict:
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out), "--calib-images", "6",
                 "--eval-images", "12"]) == 0
    return json.loads((out / "analysis.json").read_text())


def test_analyze_runs_on_an_hf_swin_checkpoint(setup, tmp_path):
    root, _ = setup
    model = HFClassifier(tiny_hf("swin", num_labels=3))
    vvtq.quantize_model(model, vvtq.QuantConfig.preset("vvtq", 2))
    vvtq.calibrate(model, [images(8)])
    spec = vvtq.ModelSpec.of(model, img_size=32, classes=["class0", "class1", "class2"])
    train_config = {"data": "image_folder", "data_root": str(root / "data"), "val_split": "test"}
    vvtq.save_model(model, tmp_path / "swin.safetensors", spec, train_config=train_config)
    res = _analyze(tmp_path / "swin.safetensors", tmp_path / "report")
    assert res["precision"] == "W2A2"
    assert {"q", "k", "v", "fc1", "attn_prob"} <= {r["label"] for r in res["sensitivity"]["kinds"]}


def test_analyze_runs_on_an_hf_vit_checkpoint(setup, tmp_path):
    root, _ = setup
    res = _analyze(root / "run" / "last.safetensors", tmp_path / "report")
    assert {"q", "k", "v", "fc1", "attn_prob"} <= {r["label"] for r in res["sensitivity"]["kinds"]}


def test_without_transformers_the_error_names_the_extra(monkeypatch, tmp_path):
    import sys

    tiny_config("vit").save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'vvtq\[hf\]'"):
        vvtq.load_model(tmp_path)


def test_readme_hf_example_runs(setup, tmp_path, capsys):
    """The README's "Use it on a Hugging Face model" block, on the saved tiny ViT instead of the hub id."""
    import re

    root, _ = setup
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Use it on a Hugging Face model\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    line = re.compile(r"^SOURCE, OUT = .*$", re.MULTILINE)
    assert len(line.findall(code)) == 1, "the README example's settings line changed: update this test"
    code = line.sub(f"SOURCE, OUT = {str(root / 'vit')!r}, Path({str(tmp_path)!r})", code)
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_hf"})
    out = capsys.readouterr().out
    assert "ViTForImageClassification: loss" in out and "runtime logits identical: True" in out, out
    model, meta = vvtq.load_model(tmp_path / "w4a4.safetensors")
    assert meta["quant"]["wbits"] == 4 and isinstance(model, HFClassifier)


def test_sources_that_would_train_wrongly_are_refused(setup, tmp_path):
    """A pretrained folder at another image size (its position embeddings would be re-initialised), a
    stochastic depth the model has no setting for, and a timm hub folder taken for an HF one."""
    from vvtq.hf import build_hf, is_hf_source

    root, _ = setup
    with pytest.raises(ConfigError, match="image_size 32 -> 64"):
        build_hf(str(root / "vit"), {"img_size": 64})
    with pytest.raises(ConfigError, match="no stochastic depth"):
        build_hf(str(root / "vit"), {}, drop_path=0.1)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 10}))
    assert not is_hf_source(str(tmp_path)) and is_hf_source(str(root / "vit"))


def test_dinov2_s_unused_mask_token_takes_no_gradient(tmp_path):
    """A classifier never uses DINOv2's mask token: frozen, so that DDP does not wait for its gradient."""
    from vvtq.hf import build_hf

    tiny_hf("dinov2").save_pretrained(tmp_path / "d")
    model = build_hf(str(tmp_path / "d"), {})
    assert not model.hf.dinov2.embeddings.mask_token.requires_grad
    assert all(p.dtype == torch.float32 for p in model.parameters())
