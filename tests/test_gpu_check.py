"""`benchmarks/gpu_check.py --device cpu --quick`: the prepared GPU check's whole path runs, on mini models."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["quick"] and "gpu_check.py" in doc["command"]
    assert [r["model"] for r in doc["step_ratio"]] == ["mini_deit", "mini_swin"]
    assert all(r["ratio"] > 0 for r in doc["step_ratio"]) and doc["summary"]["max_ratio"] > 0
    train = doc["train"]
    assert train["loss_finite"] and train["loss_falls"] and len(train["losses"]) == train["qat_steps"]
    assert train["runtime_agreement"] >= 0.99 and train["packed_bytes"] > 0


def test_gpu_check_without_cuda_says_so():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2 and "no CUDA device here" in res.stderr
