"""Tests for ``vvtq analyze``: the report files, plots, comparison and the mixed-precision file."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch

import vvtq
from fakes import write_image_folder
from vvtq.cli import main

KW = {"depth": 1, "in_chans": 3, "num_classes": 3}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny RGB image folder and two checkpoints of a 1-block mini_deit: FP and W2A2 (calibrated)."""
    root = tmp_path_factory.mktemp("analyze")
    write_image_folder(root / "data", {"train": 12, "test": 9}, 28)
    spec = vvtq.ModelSpec("mini_deit", KW, img_size=28, classes=["class0", "class1", "class2"])
    train_config = {"data": "image_folder", "data_root": str(root / "data"), "val_split": "test"}
    torch.manual_seed(0)
    fp = timm.create_model("mini_deit", **KW)
    vvtq.save_model(fp, root / "fp.safetensors", spec, train_config=train_config)
    qm = vvtq.quantize_model(copy.deepcopy(fp), vvtq.QuantConfig.preset("vvtq", wbits=2))
    vvtq.calibrate(qm, [torch.randn(8, 3, 28, 28)])
    vvtq.save_model(qm, root / "q.safetensors", spec, train_config=train_config)
    with open(root / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            rec = {"type": "step", "step": step * 10, "loss": 1.0, "osc/overall": 0.01 * step,
                   "osc/blocks.0.attn.q.weight_quant": 0.02 * step,
                   "osc/blocks.0.mlp.fc1.weight_quant": 0.001}
            f.write(json.dumps(rec) + "\n")
        f.write(json.dumps({"type": "epoch", "step": 50, "val_acc": 40.0}) + "\n")
    return root


def _check_report(out, pngs):
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for name in pngs:
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size < 300_000, name
        assert f"]({name})" in md
    assert page.count("data:image/png;base64,") == md.count("![")
    return md, page


def test_analyze_fp_checkpoint_writes_report_with_plots(setup):
    out = setup / "rep_fp"
    rc = main(["analyze", "--checkpoint", str(setup / "fp.safetensors"), "--out", str(out),
               "--calib-images", "6", "--eval-images", "9", "--metrics", str(setup / "metrics.jsonl")])
    assert rc == 0
    md, _page = _check_report(out, [
        "sensitivity_kinds.png", "sensitivity_blocks.png", "sensitivity_layers.png", "kurtosis_weights.png",
        "kurtosis_acts.png", "kurtosis_heads.png", "std_weights.png", "std_acts.png", "std_heads.png",
        "weight_histograms.png", "oscillation.png"])
    res = json.loads((out / "analysis.json").read_text())
    assert res["precision"] == "FP" and res["mode"] == "ptq" and res["eval_images"] == 9
    assert res["oscillation"]["final_overall"] == pytest.approx(0.05)
    kinds = {r["label"] for r in res["sensitivity"]["kinds"]}
    assert {"q", "k", "v", "proj", "fc1", "fc2", "attn_prob", "mlp_hidden", "all"} <= kinds
    assert "mixed_precision.yaml" not in md and not (out / "mixed_precision.yaml").exists()


def test_analyze_quantized_with_compare_and_bit_budget(setup):
    out = setup / "rep_q"
    rc = main(["analyze", "--checkpoint", str(setup / "q.safetensors"),
               "--compare", str(setup / "fp.safetensors"), "--out", str(out), "--calib-images", "6",
               "--eval-images", "9", "--bit-budget", "3"])
    assert rc == 0
    md, _ = _check_report(out, ["sensitivity_kinds.png", "kurtosis_heads.png", "weight_histograms.png"])
    res = json.loads((out / "analysis.json").read_text())
    assert res["precision"] == "W2A2" and res["mode"] == "learned"
    assert res["compare"]["precision"] == "FP" and "Comparison with" in md
    mp = res["mixed_precision"]
    assert mp["average_bits"] <= 3.0 and len(mp["assignment"]) == 6
    cfg = vvtq.QuantConfig.preset("vvtq", wbits=2).with_overrides_file(out / "mixed_precision.yaml")
    assert {k: v["wbits"] for k, v in cfg.overrides.items()} == mp["assignment"]


def test_analyze_reports_a_missing_checkpoint(setup, capsys):
    rc = main(["analyze", "--checkpoint", str(setup / "nope.safetensors"), "--out", str(setup / "x")])
    assert rc == 2 and "vvtq: error" in capsys.readouterr().err
