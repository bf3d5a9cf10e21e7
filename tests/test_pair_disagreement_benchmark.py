"""``benchmarks/pair_disagreement.py``: a model against itself disagrees nowhere; models of other image sizes are
refused before anything is scored."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "src" / "vvtq" / "assets" / "mini_deit_fmnist.safetensors"
SWIN = ROOT / "benchmarks" / "results" / "accuracy_v2_teachers" / "mini_swin_fp.safetensors"


def _module():
    spec = importlib.util.spec_from_file_location("pair_disagreement", ROOT / "benchmarks" / "pair_disagreement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_model_against_itself_and_against_another_image_size():
    mod = _module()
    (row,) = mod.compare(str(ASSET), str(ASSET), splits=("holdout",))
    assert row["images"] == 5000 and row["disagree"] == 0 and row["difference"] == 0 and row["se"] == 0
    assert 50 < row["top1"][0] <= 100
    with pytest.raises(ValueError, match="28 and 32 px"):
        mod.compare(str(ASSET), str(SWIN))
