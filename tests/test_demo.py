"""`vvtq demo --quick` runs end to end and prints its table (the numbers of a quick run mean nothing)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from vvtq.demo import ASSET


def test_demo_quick(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vvtq", "--threads", "1", "demo", "--quick", "--out",
                          str(tmp_path / "demo")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "FP32 teacher" in out and "W2A2 (vvtq)" in out and "W2A2 packed" in out and "MB" in out
    # the deployed model is the evaluated model: the runtime reproduces its logits exactly
    assert "1000/1000 predictions agree (identical logits)" in out, out[-1500:]
    # the fast ONNX export: its agreement with the runtime (1000 images: at most a few flips) and its speed vs FP
    m = re.search(r"vs integer runtime: (\d+)/1000 predictions agree .* FP ONNX [\d.]+ ms, W2A2 fast ONNX [\d.]+ ms "
                  r"\([\d.]+x\)", out)
    assert m and int(m.group(1)) >= 990, out[-1500:]
    assert "W2A2 ONNX fast" in out and (tmp_path / "demo" / "w2a2" / "model.fast.onnx").is_file()
    assert (tmp_path / "demo" / "w2a2" / "last.safetensors").is_file()
    assert (tmp_path / "demo" / "w2a2" / "model.vvtq.safetensors").is_file()
    if ASSET.is_file():
        assert "shipped" in out
