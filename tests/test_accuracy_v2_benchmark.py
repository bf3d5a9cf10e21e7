"""`benchmarks/accuracy_v2.py`: the plan (equal crops, held-out scoring, one factor at a time) and the `--quick`
path end to end with two workers, including resumption (the numbers of a quick run mean nothing)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vvtq.demo import ship_teacher
from vvtq.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accuracy_v2.py"
TINY = ["train_subset=64", "val_subset=50", "batch_size=32", "epochs=1", "progress=false", "max_steps=1"]


def _module():
    spec = importlib.util.spec_from_file_location("accuracy_v2_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _steps(cfg) -> int:
    """The steps the training loop takes for this recipe (its own rule)."""
    return math.ceil(cfg.epochs * ((cfg.train_subset or 55_000) // (cfg.batch_size // cfg.num_crops)))


def test_plan_equal_crops_holdout_and_one_factor_at_a_time(tmp_path):
    acc = _module()
    args = acc.parse_args(["--work", str(tmp_path / "w")])
    runs = acc.plan(args)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    assert {r.model for r in runs} == {"mini_deit", "mini_swin"}
    for r in runs:
        c = r.cfg
        assert c.holdout == 5000 and c.val_split == "test" and c.init_from.endswith(f"{r.model}_fp.safetensors")
        assert _steps(c) == 938 and c.batch_size == 128  # equal steps of equal crops: >= 120,000 crops
        assert (c.oscillation is not None) == (r.bits == 2)
    ceiling = {(r.model, r.recipe) for r in runs if r.group == "ceiling"}  # the FP model trained on: no quantizer
    assert ceiling == {(m, k) for m in acc.MODELS for k in ("", "lr=1e-3")}
    assert all(r.cfg.quant is None and r.bits == 32 and r.cfg.teacher.to_dict() == {"source": "none"} for r in runs
               if r.group == "ceiling")
    with pytest.raises(acc.StudyError, match="an FP row"):
        acc.build_cfg("mini_deit", 32, "md", 0, 1000, "test", tmp_path, "x", acc.Context("mini_deit", "T", "U"), False)
    w2 = {(r.model, r.recipe, r.seed) for r in runs if r.bits == 2}
    for key in ("lsq", "best", "pilots", "paper"):
        assert {(m, acc.RECIPES[key][1], s) for m in acc.MODELS for s in (0, 1, 2)} <= w2
    # every cumulative ablation row adds exactly one factor to the row before it
    rows = acc.ablation_recipes(("kd+hard=0.5+md", "lr=1e-3+md"), ("kd+crops=4+wide",))
    assert rows == ["", "kd", "kd+hard=0.5", "md", "lr=1e-3", "crops=4", "wide", "kd+hard=0.5+md", "lr=1e-3+md"]
    # the default: the chosen recipe and the pilots' choice built up row by row, the published recipe's factors alone
    rows = acc.ablation_recipes()
    assert {"lr=1e-3", "md", "lr=1e-3+md", "kd+crops=2", "kd+crops=2+lr=1e-3", "wide", "reg"} <= set(rows)
    cfgs = {r: acc.build_cfg("mini_deit", 2, r, 0, 1000, "test", tmp_path, "x", acc.Context("mini_deit", "T", "U"),
                             False) for r in ("", "kd", "kd+crops=4", "kd+crops=4+wide", "kd+ens", "md", "sgelu")}
    assert cfgs[""].teacher.to_dict() == {"source": "none"} and cfgs[""].crop_scale == (0.8, 1.0)
    assert cfgs["kd"].teacher.to_dict() == {"source": "live", "checkpoint": "T"} and cfgs["kd"].num_crops == 1
    assert cfgs["kd+crops=4"].num_crops == 4 and cfgs["kd+crops=4"].crop_scale == (0.8, 1.0)
    assert cfgs["kd+crops=4+wide"].crop_scale == (0.35, 1.0)
    assert cfgs["kd+ens"].teacher.checkpoint == ["T", "U"]
    ctx = acc.Context("mini_deit", "T", "U", "C")
    assert acc.build_cfg("mini_deit", 2, "kd+cnn", 0, 1000, "test", tmp_path, "x", ctx, False).teacher.to_dict() == \
        {"source": "live", "checkpoint": "C"}
    assert acc.build_cfg("mini_deit", 2, "kd+ens+cnn", 0, 1000, "test", tmp_path, "x", ctx, False) \
        .teacher.checkpoint == ["T", "U", "C"]
    assert acc.build_cfg("mini_deit", 2, "kd", 0, 1000, "test", tmp_path, "x", ctx, False).init_from == "T"
    assert cfgs["md"].quant.preset == "vvtq" and cfgs["sgelu"].quant.gelu_signed is True
    for recipe, heads in (("lnch", "tensor"), ("md+lnch", "head")):  # per-channel LayerNorm outputs, nothing else
        acts = acc.build_cfg("mini_deit", 2, recipe, 0, 1000, "test", tmp_path, "x", ctx, False) \
            .quant_config().act_granularity
        assert acts["attn_in"] == acts["mlp_in"] == "channel" and acts["mlp_hidden"] == "tensor"
        assert acts["k_act"] == heads
    with pytest.raises(acc.StudyError, match="unknown factor 'kdd'"):
        acc.parse_factors("kdd")
    with pytest.raises(acc.StudyError, match="needs 'kd' before it"):
        acc.build_cfg("mini_deit", 2, "hard", 0, 1000, "test", tmp_path, "x", acc.Context("mini_deit", "T", "U"),
                      False)
    late = acc.build_cfg("mini_deit", 2, "kd+crops=2+single+cga=0.9", 0, 1000, "test", tmp_path, "x", ctx, False)
    assert late.single_crop_frac == 0.2 and late.anneal.to_dict() == {"start_frac": 0.9}
    with pytest.raises(acc.StudyError, match="'single' needs 'crops=K'"):
        acc.build_cfg("mini_deit", 2, "kd+single", 0, 1000, "test", tmp_path, "x", ctx, False)
    pilots = acc.plan(acc.parse_args(["--pilots", "--work", str(tmp_path / "w")]))
    assert all(r.cfg.val_split == "holdout" and r.seed == 0 and r.name.startswith("pilot_") for r in pilots)
    assert {r.recipe for r in pilots} == set(acc.PILOTS)


def test_only_the_claims_of_finished_workers_are_cleared(tmp_path):
    _module()  # loads the shared runner the script imports
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "accuracy_v2"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a pid reused by another program
    try:
        for name, pid in (("a", live.pid), ("b", int(dead.stdout)), ("c", other.pid), ("d", "")):
            (tmp_path / name).mkdir()
            (tmp_path / name / "claim").write_text(str(pid))
        sys.modules["study_runs"].clear_stale_claims(tmp_path, b"accuracy_v2")
        assert sorted(p.parent.name for p in tmp_path.glob("*/claim")) == ["a"]
    finally:
        live.kill()
        other.kill()
    runs = sys.modules["study_runs"]  # the shared runner the script imports
    run = runs.Run("r", "mini_deit", "main", "", 2, 0, argparse.Namespace(out=str(tmp_path / "r")))
    assert runs.claim(run) and not runs.claim(run)
    assert (tmp_path / "r" / "claim").read_text() == str(os.getpid())


def _teachers(folder: Path) -> Path:
    for model in ("mini_deit", "mini_swin"):
        out = folder / model
        train(TrainConfig.from_recipe(f"{model}_fp", TINY + [f"out={out}"]))
        ship_teacher(out / "last.safetensors", folder / f"{model}_fp.safetensors")
    return folder


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_quick_pilots_two_workers_then_resume(tmp_path):
    teachers = _teachers(tmp_path / "teachers")
    common = ["--work", str(tmp_path / "w"), "--store", str(tmp_path / "s"), "--out", str(tmp_path / "o"),
              "--teachers", str(teachers)]
    res = _run("--pilots", "--recipes", "", "kd+ens+md", "--jobs", "2", *common)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "workers finished with exit codes [0, 0]" in res.stdout
    store = tmp_path / "s"
    done = sorted(p.name for p in store.glob("*.json"))
    assert done == ["pilot_mini_deit_kd_ens_md_w2a2_s0.json", "pilot_mini_deit_lsq_w2a2_s0.json"]
    for name in done:
        r = json.loads((store / name).read_text())
        assert r["scored_on"] == "holdout" and 0 <= r["final_acc"] <= 100 and r["osc_lowbit"] is not None
        assert (store / name.replace(".json", ".metrics.jsonl.gz")).is_file()
    doc = json.loads((tmp_path / "o" / "accuracy_v2.json").read_text())
    assert "benchmarks/accuracy_v2.py" in doc["command"] and len(doc["pilots"]) == 2
    row = doc["summary"]["mini_deit"]
    for key in ("fp", "lsq.w2a2", "best.w2a2", "paper.w2a2", "lsq.w4a4", "best.w4a4", "best_w2a2_seeds",
                "lsq_w2a2_seeds", "crops_per_run"):
        assert key in row
    md = (tmp_path / "o" / "accuracy_v2.md").read_text()
    assert "## Pilots" in md and "`kd+ens+md`" in md and (tmp_path / "o" / "accuracy_v2.png").stat().st_size > 0

    # a finished run is not trained again; one whose stored result is gone continues from its checkpoint
    before = json.loads((store / done[1]).read_text())
    (store / done[1]).unlink()
    res = _run("--pilots", "--recipes", "", "kd+ens+md", *common)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.count("starting") == 1 and "(continuing)" in res.stdout
    after = json.loads((store / done[1]).read_text())
    assert after["resumed"] and after["final_acc"] == before["final_acc"] and after["steps"] == before["steps"]


def test_the_shipped_vvtq_recipes_train_the_studys_best_recipe(tmp_path):
    """`mini_*_w2a2_vvtq` (and the demo's) is what the study measured as `best`, and `*_paper` its `paper`: every
    training setting but the study's own bookkeeping (data split, length, logging) is the same."""
    from vvtq.train import TrainConfig

    acc = _module()
    ctx = acc.Context("mini_deit", "T", "U")
    same = ("quant", "teacher", "regularizer", "num_crops", "crop_scale", "lr", "min_lr", "weight_decay", "clip_grad",
            "label_smoothing", "batch_size", "calib_batches")
    for model in acc.MODELS:
        for key, recipe in (("best", f"{model}_w2a2_vvtq"), ("paper", f"{model}_w2a2_paper")):
            study = acc.build_cfg(model, 2, acc.RECIPES[key][1], 0, 1000, "test", tmp_path, "x", ctx, False)
            shipped = TrainConfig.from_recipe(recipe, ["teacher.checkpoint=T"] if key == "paper" else [])
            for name in same:
                assert getattr(shipped, name) == getattr(study, name), (recipe, name)
    demo = TrainConfig.from_recipe("demo_mini_deit_w2a2")
    assert all(getattr(demo, n) == getattr(TrainConfig.from_recipe("mini_deit_w2a2_vvtq"), n) for n in same)
