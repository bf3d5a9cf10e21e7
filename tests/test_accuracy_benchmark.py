"""`benchmarks/accuracy.py`: the study's plan (equal budgets, seeds, ablation, oscillation) and the `--quick` path
end to end, including resumption (the numbers of a quick run mean nothing)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"


def _module():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--threads", "1", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_plan_equal_budgets_seeds_and_ablation(tmp_path):
    acc = _module()
    args = acc.parse_args(["--work", str(tmp_path / "w"), "--teacher-deit", "T.safetensors"])
    runs, fp_runs = acc.plan(args, {"mini_deit": "T.safetensors"})
    assert set(fp_runs) == {"mini_swin"}  # the deit teacher is given, the swin one is trained here
    qat = [r for r in runs if r.cfg.quant is not None]
    assert len(qat) == 24  # 2 models x 2 recipes x (W4, W3, W2 x 2 seeds) + 4 new ablation settings x 2 seeds
    for r in qat:
        assert r.cfg.epochs * r.cfg.num_crops == args.budget
        assert r.cfg.out == str(tmp_path / "w" / r.name)
        assert (r.cfg.oscillation is not None) == (r.bits == 2)
        if r.model == "mini_deit":
            assert r.cfg.init_from == "T.safetensors"
            if r.cfg.teacher["source"] == "live":
                assert r.cfg.teacher["checkpoint"] == "T.safetensors"
    w2 = {(r.model, r.kind, r.seed) for r in qat if r.bits == 2}
    assert {(m, k, s) for m in ("mini_deit", "mini_swin") for k in ("lsq", "vvtq") for s in (0, 1)} <= w2
    by_name = {r.name: r for r in runs}
    # the full cumulative ablation row is the VVTQ recipe itself, and the baseline row is the LSQ run
    assert "ablation:kd_md_reg" in by_name["mini_deit_vvtq_w2a2_s1"].groups
    assert "ablation:lsq" in by_name["mini_deit_lsq_w2a2_s0"].groups
    kd = by_name["mini_deit_abl_kd_w2a2_s0"].cfg
    assert kd.num_crops == 4 and kd.quant["preset"] == "lsq" and kd.regularizer is None
    md = by_name["mini_deit_abl_md_w2a2_s0"].cfg
    assert md.num_crops == 1 and md.quant["preset"] == "vvtq" and md.teacher["source"] == "none"
    reg = by_name["mini_deit_abl_reg_w2a2_s0"].cfg
    assert reg.regularizer["lambda_max"] == 0.01 and reg.quant["preset"] == "lsq"


def test_shards_cover_every_run_once_teachers_first(tmp_path):
    acc = _module()
    args = acc.parse_args(["--work", str(tmp_path / "w")])
    runs, fp_runs = acc.plan(args, {})
    shards = acc.assign_shards(runs, 2, 1)
    names = [r.name for sh in shards for r in sh]
    assert sorted(names) == sorted(r.name for r in runs)  # each run in exactly one shard
    assert {shards[0][0].name, shards[1][0].name} == {r.name for r in fp_runs.values()}  # one teacher each
    loads = [sum(acc.estimate_s(r, 1, fresh=True) for r in sh) for sh in shards]
    assert max(loads) - min(loads) <= max(acc.estimate_s(r, 1, fresh=True) for r in runs)
    assert [r.name for r in acc.assign_shards(runs, 2, 1)[0]] == [r.name for r in shards[0]]  # deterministic


def test_quick_end_to_end_and_resume(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    res = _run("--quick", "--models", "mini_deit", "--seeds", "0", "--no-ablation", "--work", str(work),
               "--out", str(out), "--jobs", "2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "workers finished with exit codes [0, 0]" in res.stdout
    assert all("starting" in (work / f"worker{k}.log").read_text() for k in (0, 1))
    for name in ("accuracy.json", "accuracy.md", "accuracy.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    doc = json.loads((out / "accuracy.json").read_text())
    assert "benchmarks/accuracy.py" in doc["command"] and "--quick" in doc["command"]
    summary = doc["summary"]
    assert set(summary) == {"mini_deit"}
    row = summary["mini_deit"]
    assert set(row) == {"fp", "lsq", "vvtq"} and isinstance(row["fp"], float)
    for recipe in ("lsq", "vvtq"):
        assert set(row[recipe]) == {"w4a4", "w3a3", "w2a2"}
        assert all(isinstance(v, float) and 0.0 <= v <= 100.0 for v in row[recipe].values())
    runs = doc["runs"]
    assert len(runs) == 7 and not any(r.get("missing") for r in runs.values())
    for r in runs.values():
        assert {"config", "seed", "final_acc", "best_acc", "wall_s"} <= set(r)
        assert (r["osc_overall"] is not None) == (r["bits"] == 2)
        assert (work / r["name"] / "result.json").is_file()
    md = (out / "accuracy.md").read_text()
    assert "## Main table" in md and "## Findings" in md and "Budget" in md and "Seeds" in md

    # a rerun detects finished runs; an unfinished one (no result.json) is continued from its checkpoint
    lsq2 = work / "mini_deit_lsq_w2a2_s0" / "result.json"
    before = json.loads(lsq2.read_text())
    lsq2.unlink()
    res = _run("--quick", "--models", "mini_deit", "--seeds", "0", "--no-ablation", "--work", str(work),
               "--out", str(out))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    after = json.loads(lsq2.read_text())
    assert after["resumed"] and after["final_acc"] == before["final_acc"] and after["steps"] == before["steps"]
    assert res.stdout.count("starting") == 1
    assert json.loads((out / "accuracy.json").read_text())["summary"] == doc["summary"]
