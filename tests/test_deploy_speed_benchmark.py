"""``benchmarks/deploy_speed.py --quick`` runs end to end and writes the JSON the README quotes (its timings on a
1-block model mean nothing)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_deploy_speed_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("deploy_speed", ROOT / "benchmarks" / "deploy_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "deploy_speed.json"
    assert mod.main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["command"] == "python benchmarks/deploy_speed.py --quick"
    assert res["threads"] == {"intra_op": 2, "inter_op": 1, "torch": 2}
    assert [c["batch"] for c in res["cases"]] == [1, 4]
    for c in res["cases"]:
        assert c["fp_ms"] > 0 and c["fast_ms"] > 0 and abs(c["ratio"] - c["fast_ms"] / c["fp_ms"]) < 0.01
        assert c["peak_mb"]["fp"] > 0 and c["peak_mb"]["fast"] > 0 and c["fast_profile_pct"]
    assert res["summary"]["ratio"] == max(c["ratio"] for c in res["cases"])
    assert res["summary"]["deit_tiny_ratio"] is None  # not measured in quick mode
    ops = res["fast_ops_after_optimization"]["mini_deit_vvtq_w2a2"]
    assert ops["MatMulIntegerToFloat"] > 0 and "MatMul" not in ops and "Gemm" not in ops
    assert len(res["notes"]) == sum(c["ratio"] >= 1.0 for c in res["cases"])
