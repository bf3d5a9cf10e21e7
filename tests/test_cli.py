"""The command line: help, one-line errors with exit status 2, and eval of a checkpoint."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vvtq.cli import main

ROOT = Path(__file__).resolve().parents[1]
FP = str(ROOT / "configs" / "mini_deit_fp.yaml")


def test_train_help_is_useful(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--config", "--resume", "--set", "torchrun", "quant.", "teacher."):
        assert word in text
    from dataclasses import fields

    from vvtq.train import TrainConfig

    flat = " ".join(text.split())
    for f in fields(TrainConfig):  # the settings list is made from the config, so none is missing
        assert f" {f.name}" in flat or f"{f.name}." in flat, f.name
    for key in ("regularizer.{lambda_max", "units}", "freeze_threshold", "gelu_signed", "hard_weight"):
        assert key in flat


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "missing.yaml"], "recipe not found: missing.yaml"),
    (["train", "--config", FP, "--set", "quant.wbits=5.5"], "got 5.5"),
    (["train", "--config", FP, "--set", "quant.wbits=9"], "wbits must be an integer in 2..8"),
    (["train", "--config", FP, "--set", "nonsense=1"], "unknown setting 'nonsense'"),
    (["train", "--config", FP, "--set", "regularizer={lambda_mx: 0.1}"], "unknown key(s) in regularizer: lambda_mx"),
    (["train", "--config", FP, "--set", "data_root=/nonexistent/fmnist"], "/nonexistent/fmnist"),
    (["eval", "--checkpoint", "/nonexistent.safetensors"], "checkpoint not found"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vvtq: error:") and message in err[0], err


def test_corrupt_checkpoint_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    assert "not a readable safetensors checkpoint" in capsys.readouterr().err


def test_train_then_eval_and_mismatched_state(tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["train_subset=128", "val_subset=100", "batch_size=32", "epochs=1", "progress=false"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["train", "--config", FP, "--out", str(out), *args]) == 0
    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), "--limit", "100"]) == 0
    assert "FP top-1" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "vvtq", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "demo" in res.stdout
