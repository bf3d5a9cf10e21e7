"""`benchmarks/cifar10.py`: the plan (equal crops and steps, held-out pilots, the soft-label file, the ceilings) and
the `--quick` path end to end on a tiny image folder: FP models trained, soft labels made, pilots run by two
workers, results written (the numbers of a quick run mean nothing)."""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fakes import write_image_folder
from vvtq.distill import SoftLabelFile
from vvtq.train import read_meta

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cifar10.py"


def _module():
    spec = importlib.util.spec_from_file_location("cifar10_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _steps(cfg, images: int = 45_000) -> int:
    return math.ceil(cfg.epochs * (images // (cfg.batch_size // cfg.num_crops)))


def test_plan_equal_steps_soft_labels_and_ceilings(tmp_path):
    c = _module()
    runs = c.plan(c.parse_args(["--work", str(tmp_path / "w"), "--models-dir", str(tmp_path / "m")]))
    assert len({r.name for r in runs}) == len(runs) and {r.model for r in runs} == set(c.MODELS)
    labels = str(tmp_path / "w" / f"softlabels_{c.SOFT_CROPS}crops_pending.safetensors")  # no teachers yet
    for r in runs:
        cfg = r.cfg
        assert cfg.holdout == 5000 and cfg.val_split == "val" and cfg.batch_size == 128
        assert _steps(cfg) == 1954 or r.group == "budget"  # equal steps of 128 crops, whatever the crops an image
        assert cfg.init_from == str(tmp_path / "m" / f"cifar10_{r.model}_fp.safetensors")
        assert cfg.data == "../shared/data/cifar10" and cfg.img_size == 32 and cfg.model_kwargs["in_chans"] == 3
        if "kd" in r.recipe.split("+"):
            assert cfg.teacher.to_dict() == {"source": "file", "softlabels": labels}
            crops = c.teacher_crops(c.parse_args(["--models-dir", str(tmp_path / "m")]))
            assert (list(cfg.crop_scale), cfg.crop_translate) == (crops["crop_scale"], crops["crop_translate"])
        else:
            assert cfg.teacher.source == "none" and cfg.crop_scale == (0.35, 1.0)  # the FP students' crops
    ceilings = {(r.model, r.recipe) for r in runs if r.group == "ceiling"}
    assert ceilings == {(m, k) for m in c.MODELS for k in ("", "kd")}
    assert all(r.cfg.quant is None for r in runs if r.group == "ceiling")
    w2 = {(r.model, r.recipe, r.seed) for r in runs if r.bits == 2}
    for model, keys in c.ROWS.items():
        assert {(model, c.RECIPES[k][1], s) for k in keys for s in c.SEEDS} <= w2
    assert {(r.model, r.bits) for r in runs if r.group == "bits"} == {(m, b) for m in c.MODELS for b in (3, 4)}
    budget = {(r.recipe, _steps(r.cfg)) for r in runs if r.group == "budget"}
    assert budget == {(c.RECIPES[k][1], math.ceil(250_000 * m / 128)) for k in ("lsq", "best") for m in c.BUDGETS}
    paper = next(r for r in runs if r.recipe == c.RECIPES["paper"][1] and r.model == "mini_deit")
    assert paper.cfg.num_crops == 4 and paper.cfg.quant.preset == "vvtq" and paper.cfg.regularizer is not None
    with pytest.raises(c.StudyError, match="unknown factor .ens."):  # one teacher here: no ensemble
        c.plan(c.parse_args(["--pilots", "--recipes", "kd+hard+ens", "--models-dir", str(tmp_path / "m")]))
    pilots = c.plan(c.parse_args(["--pilots", "--work", str(tmp_path / "w"), "--models-dir", str(tmp_path / "m")]))
    assert all(r.cfg.val_split == "holdout" and r.seed == 0 and r.model == "mini_deit" for r in pilots)
    assert all(_steps(r.cfg) == 500 for r in pilots)


def test_quick_end_to_end(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, {"train": 120, "val": 30}, px=32, classes=10)
    common = ["--quick", "--threads", "1", "--data", str(data), "--models-dir", str(tmp_path / "m"), "--work",
              str(tmp_path / "w"), "--store", str(tmp_path / "s"), "--out", str(tmp_path / "o")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--pilots", "--recipes", "", "kd+crops=2", "--jobs", "2",
                          *common], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "workers finished with exit codes [0, 0]" in res.stdout
    for key in ("cifar_resnet_teacher", "cifar_resnet_teacher_b", "cifar10_mini_deit_fp"):
        assert (tmp_path / "m" / f"{key}.safetensors").is_file()
        assert (tmp_path / "m" / f"{key}.metrics.jsonl.gz").is_file()
    assert not (tmp_path / "m" / "cifar10_mini_swin_fp.safetensors").exists()  # no pilot of it: not trained
    c = _module()
    args = c.parse_args(common)
    label_file = c.softlabel_path(args)
    assert label_file.is_file() and "pending" not in label_file.name
    assert SoftLabelFile(label_file).meta["flip_average"] is True and SoftLabelFile(label_file).meta["amp"] == "bf16"
    labels = json.loads(label_file.with_suffix(".json").read_text())
    assert labels["command"].startswith("vvtq --threads 1 softlabels --teacher") and labels["bytes"] > 0
    assert len(labels["teachers"]) == 2 and "mean of 2 cifar_resnet" in json.loads(
        (tmp_path / "o" / "cifar10.json").read_text())["teacher"]["name"]
    done = sorted(p.name for p in (tmp_path / "s").glob("*.json"))
    assert done == ["pilot_mini_deit_kd_crops2_w2a2_s0.json", "pilot_mini_deit_lsq_w2a2_s0.json"]
    kd = json.loads((tmp_path / "s" / done[0]).read_text())
    assert kd["config"]["teacher"] == {"source": "file", "softlabels": str(label_file)}
    assert kd["num_crops"] == 2 and kd["scored_on"] == "holdout"
    doc = json.loads((tmp_path / "o" / "cifar10.json").read_text())
    assert doc["command"].startswith("python benchmarks/cifar10.py") and len(doc["pilots"]) == 2
    assert set(doc["teacher"]) >= {"name", "top1"} and doc["teacher"]["top1"] is not None
    for model in ("mini_deit", "mini_swin"):
        row = doc["summary"][model]
        for key in ("fp", "fp_trained_on", "fp_kd_trained_on", "lsq.w2a2", "best.w2a2", "paper.w2a2", "lsq.w4a4",
                    "best.w4a4", "best_w2a2_seeds", "lsq_w2a2_seeds", "crops_per_run"):
            assert key in row, key
        assert ("budget_axis" in row) == (model == "mini_deit")
        assert (row["fp"] is not None) == (model == "mini_deit") and row["lsq.w2a2"] is None  # study: not run
    assert "## Pilots" in (tmp_path / "o" / "cifar10.md").read_text()
    assert (tmp_path / "o" / "cifar10.png").stat().st_size > 0
    # new teachers' weights name another label file, so the runs that distil are other runs
    deit = [r for r in c.plan(args) if r.model == "mini_deit"]
    c.ensure_inputs(args, [r for r in deit if r.cfg.teacher.source == "none"])  # no labels needed: none made
    teacher_b = tmp_path / "m" / "cifar_resnet_teacher_b.safetensors"
    shutil.copyfile(tmp_path / "m" / "cifar_resnet_teacher.safetensors", teacher_b)
    assert c.softlabel_path(args) != label_file and not c.softlabel_path(args).exists()
    kd_run = next(r for r in c.plan(args) if r.cfg.teacher.source == "file")
    assert kd_run.cfg.teacher.softlabels == str(c.softlabel_path(args))
    # an unfinished FP run (here: the DeiT's checkpoint as mini_swin's) is saved for a new machine to continue;
    # the finished ones are not
    swin = tmp_path / "w" / "fp" / "mini_swin"
    swin.mkdir(parents=True)
    shutil.copyfile(tmp_path / "w" / "fp" / "mini_deit" / "last.safetensors", swin / "last.safetensors")
    step = read_meta(swin / "last.safetensors")["step"]
    (swin / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (step - 1, step, step + 1)))
    assert c.save_progress(args) == [f"mini_swin at step {step}"]
    resume = tmp_path / "m" / "cifar10_mini_swin_fp.resume.safetensors"
    assert resume.read_bytes() == (swin / "last.safetensors").read_bytes()
    with gzip.open(tmp_path / "m" / "cifar10_mini_swin_fp.metrics.jsonl.gz", "rt") as f:
        assert [json.loads(line)["step"] for line in f] == [step - 1, step]  # nothing past the checkpoint
