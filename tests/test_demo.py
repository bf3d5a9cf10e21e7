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


# `vvtq demo` as after a plain `pip install vvtq` (no extras): the path finder no longer finds onnx, onnxruntime
# and onnxscript (nor their distributions), so importing them fails and importlib.util.find_spec says None
_WITHOUT_ONNX = """
import sys
from importlib.machinery import PathFinder

EXTRA = ("onnx", "onnxruntime", "onnxscript")


class _PathFinderWithoutOnnx(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in EXTRA else PathFinder.find_spec(name, path, target)

    @staticmethod
    def find_distributions(*args, **kwargs):
        return (d for d in PathFinder.find_distributions(*args, **kwargs)
                if (d.metadata["Name"] or "").lower() not in EXTRA)


sys.meta_path[:] = [_PathFinderWithoutOnnx if f is PathFinder else f for f in sys.meta_path]
assert not [m for m in sys.modules if m.partition(".")[0] in EXTRA]
from vvtq.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_demo_quick_without_the_onnx_extra(tmp_path):
    """Without the ``onnx`` extra the demo runs to the end; its ONNX row is one line naming the extra."""
    res = subprocess.run([sys.executable, "-c", _WITHOUT_ONNX, "--threads", "1", "demo", "--quick", "--out",
                          str(tmp_path / "demo")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "W2A2 packed" in out and "1000/1000 predictions agree (identical logits)" in out, out[-1500:]
    onnx_lines = [line for line in out.splitlines() if "onnx" in line.lower()]
    assert len(onnx_lines) == 1 and "pip install 'vvtq[onnx]'" in onnx_lines[0], onnx_lines
    assert onnx_lines[0].startswith("W2A2 ONNX fast") and "skipped" in onnx_lines[0]
    assert not list((tmp_path / "demo" / "w2a2").glob("*.onnx"))
