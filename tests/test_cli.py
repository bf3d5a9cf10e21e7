"""The command line: help, one-line errors with exit status 2, and eval of a checkpoint."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vvtq.cli import main
from vvtq.train import CheckpointError, ConfigError, TrainingError

ROOT = Path(__file__).resolve().parents[1]
FP = "mini_deit_fp"  # a shipped recipe, by name
QAT = "mini_deit_w2a2_paper"  # the published recipe: 4 crops, KD, regularizer
NO_DATA = "data_root=/nonexistent/fmnist"  # any attempt to read images would fail with another message


def test_train_help_is_useful(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--config", "--resume", "--set", "torchrun", "quant.", "teacher."):
        assert word in text
    from vvtq.train.config import setting_names

    flat = " ".join(text.split())
    for name in setting_names():  # the settings list is made from the config and the levers, so none is missing
        assert f" {name}" in flat or f"{name}." in flat, name
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
    (["eval", "--packed", "/nonexistent.vvtq.safetensors", "--flip"], "--packed and --onnx files run as they are"),
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
    single = capsys.readouterr().out
    assert "FP top-1" in single
    # the same model twice is an ensemble that agrees with it: the same top-1 and loss
    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), str(out / "last.safetensors"), "--limit",
                 "100"]) == 0
    twice = capsys.readouterr().out
    assert "mean of 2 FP models' top-1" in twice
    assert twice.split("top-1")[1].split("(")[0].split() == single.split("top-1")[1].split("(")[0].split()
    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), "--limit", "100", "--flip"]) == 0
    mirrored = capsys.readouterr().out
    assert "FP (image and mirror) top-1" in mirrored
    assert mirrored.split("loss")[1].split()[0] != single.split("loss")[1].split()[0]  # the mirror did count


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "vvtq", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "demo" in res.stdout


def _capture_train(monkeypatch) -> list:
    """Replace the training loop by a recorder of the config it gets (no data is read)."""
    seen = []

    def fake_train(cfg, resume=False):
        seen.append(cfg)
        return {"step": 0, "final_acc": 0.0, "best_acc": 0.0, "wall_s": 0.0}

    monkeypatch.setattr("vvtq.train.train", fake_train)
    return seen


def test_common_settings_flags_override_the_recipe_and_set(monkeypatch, tmp_path):
    seen = _capture_train(monkeypatch)
    argv = ["train", "--config", QAT, "--set", "quant.wbits=4", "--set", "lr=0.1", "--preset", "lsq", "--wbits", "3",
            "--abits", "4", "--epochs", "0.5", "--lr", "2e-4", "--batch-size", "64", "--seed", "7", "--out",
            str(tmp_path / "o"), "--init-from", "fp.safetensors", "--teacher", "t.safetensors"]
    assert main(argv) == 0
    cfg = seen[0]
    assert cfg.quant.preset == "lsq" and cfg.quant.wbits == 3 and cfg.quant.abits == 4
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed) == (0.5, 2e-4, 64, 7)
    assert cfg.out == str(tmp_path / "o") and cfg.init_from == "fp.safetensors"
    assert cfg.teacher.source == "live" and cfg.teacher.checkpoint == "t.safetensors"
    assert cfg.regularizer.to_dict() == {"lambda_max": 0.01, "start_frac": 0.25}  # the rest comes from the recipe
    qc = cfg.quant_config()
    assert (qc.wbits, qc.abits, qc.split_qkv) == (3, 4, False)
    assert main(["train", "--config", f"{QAT}.yaml", "--out", str(tmp_path / "p")]) == 0  # name with .yaml
    assert seen[1].quant.wbits == 2 and seen[1].lr == 5e-4


def test_a_run_stopped_before_any_validation_says_so(monkeypatch, tmp_path, capsys):
    """``max_steps`` can stop a run before its first validation: no 'nan%' in the summary line."""
    seen = _capture_train(monkeypatch)
    monkeypatch.setattr("vvtq.train.train", lambda cfg, resume=False: seen.append(cfg) or
                        {"step": 40, "final_acc": float("nan"), "best_acc": -1.0, "wall_s": 6.0})
    assert main(["train", "--config", QAT, "--set", "max_steps=40", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "done: 40 steps, not validated yet" in out and "nan" not in out


@pytest.mark.parametrize("flags, sets, message", [
    (["--wbits", "9"], ["quant.wbits=9"], "wbits must be an integer in 2..8"),
    (["--abits", "1"], ["quant.abits=1"], "abits must be an integer in 2..8"),
    (["--preset", "lsqq"], ["quant.preset=lsqq"], "unknown preset 'lsqq'"),
    (["--batch-size", "0"], ["batch_size=0"], "num_crops and batch_size must be >= 1"),
    (["--batch-size", "6"], ["batch_size=6"], "batch_size (6) must be a multiple of num_crops (4)"),
    (["--lr", "-1"], ["lr=-1"], "epochs and lr must be positive"),
    (["--epochs", "0"], ["epochs=0"], "epochs and lr must be positive"),
])
def test_flags_are_checked_like_set(flags, sets, message, monkeypatch, capsys):
    seen = _capture_train(monkeypatch)
    errors = []
    for extra in (flags, [a for s in sets for a in ("--set", s)]):
        assert main(["train", "--config", QAT, "--set", NO_DATA, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        errors.append(err[0])
    assert errors[0] == errors[1] and not seen


@pytest.mark.parametrize("override, key, valid", [
    ("regularizer={lambda_mx: 0.1}", "lambda_mx", "lambda_max, start_frac, variance"),
    ("regularizer.lambda_mx=0.1", "lambda_mx", "lambda_max, start_frac, variance"),
    ("oscillation={every: 1, freeze: 0.1}", "freeze", "momentum, threshold, freeze_threshold, every"),
    ("teacher.hard=0.5", "hard", "source, checkpoint, softlabels, hard_weight"),
    ("quant={preset: vvtq, wbit: 2}", "wbit", "preset, overrides_file, wbits, abits"),
    ("quant.gelu_sign=true", "gelu_sign", "preset, overrides_file, wbits, abits"),
])
def test_a_mistyped_key_in_any_sub_mapping_fails_before_any_data_is_read(override, key, valid, monkeypatch,
                                                                         capsys):
    seen = _capture_train(monkeypatch)
    assert main(["train", "--config", QAT, "--set", NO_DATA, "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"vvtq: error: unknown key\(s\) in \w+: {key}[ ;]", err[0]), err
    assert f"valid keys: {valid}" in err[0] and "nonexistent" not in err[0] and not seen
    if key == "gelu_sign":
        assert "did you mean 'gelu_signed'?" in err[0]


def test_recipes_lists_every_shipped_recipe_with_its_description(capsys):
    from vvtq.recipes import recipe_names

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = recipe_names()
    assert [line.split()[0] for line in lines] == names and len(names) >= 25
    by_name = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert by_name["mini_deit_fp"].startswith("FP teacher: mini DeiT")
    assert by_name["demo_mini_deit_w2a2"].startswith("The demo's W2A2 run")
    assert main(["recipes", "mini_swin_fp"]) == 0
    assert "model: mini_swin" in capsys.readouterr().out
    assert main(["recipes", "mini_swin_fpp"]) == 2
    assert "close names: mini_swin_fp" in capsys.readouterr().err


@pytest.mark.parametrize("exc, line", [
    (ConfigError("bad\nrecipe"), "vvtq: error: bad recipe"),
    (CheckpointError("corrupt"), "vvtq: error: corrupt"),
    (TrainingError("non-finite loss"), "vvtq: error: non-finite loss"),
    (PermissionError(13, "Permission denied", "x.yaml"), "vvtq: error: [Errno 13] Permission denied: 'x.yaml'"),
])
def test_vvtq_errors_and_os_errors_are_one_line_status_2(exc, line, monkeypatch, capsys):
    def fail():
        raise exc

    monkeypatch.setattr("vvtq.recipes.list_recipes", fail)
    monkeypatch.delenv("VVTQ_DEBUG", raising=False)
    assert main(["recipes"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [line] and captured.out == ""


@pytest.mark.parametrize("exc", [KeyError("bug"), ValueError("a bug, not an input error"), ZeroDivisionError()])
def test_anything_else_keeps_its_traceback(exc, monkeypatch):
    def fail():
        raise exc

    monkeypatch.setattr("vvtq.recipes.list_recipes", fail)
    with pytest.raises(type(exc)):
        main(["recipes"])


def test_vvtq_debug_shows_the_traceback_of_an_expected_error(monkeypatch):
    monkeypatch.setenv("VVTQ_DEBUG", "1")
    with pytest.raises(ConfigError, match="recipe not found: nothing_like_it"):
        main(["train", "--config", "nothing_like_it"])


_CUDA_WARNING = "No CUDA runtime is found"
_COMMANDS = """
import logging, sys
from vvtq.cli import main
for argv in (["--help"], ["train", "--help"], ["recipes"]):
    try:
        main(argv)
    except SystemExit:
        pass
import torch.utils.cpp_extension  # what torch.compile's CPU code generator imports (the fused fake-quant kernels)
logging.getLogger("torch.utils.cpp_extension").warning("another message of that logger")
"""


def test_no_cuda_runtime_warning_on_a_cpu_machine(tmp_path):
    """torch logs the warning when torch.utils.cpp_extension is imported with a CUDA toolkit present and no GPU;
    vvtq drops that one line (and only it)."""
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}  # a toolkit, no usable GPU
    plain = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"], capture_output=True,
                           text=True, env=env, timeout=120)
    if _CUDA_WARNING not in plain.stderr:
        pytest.skip("this torch build does not log the warning (no CUDA support compiled in)")
    res = subprocess.run([sys.executable, "-c", _COMMANDS], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert _CUDA_WARNING not in res.stderr + res.stdout
    assert "another message of that logger" in res.stderr  # the logger's other messages still show
    assert "usage: vvtq" in res.stdout and "mini_deit_fp" in res.stdout


def _quantized_checkpoint(path: Path) -> Path:
    """A small calibrated W2A2 mini DeiT checkpoint (no training), recorded on Fashion-MNIST's test split."""
    import timm

    import vvtq.models  # noqa: F401
    from vvtq.checkpoint import save_checkpoint
    from vvtq.quant import QuantConfig, calibrate, quantize_model
    from vvtq.spec import ModelSpec

    torch.manual_seed(0)
    m = quantize_model(timm.create_model("mini_deit", depth=1), QuantConfig.preset("vvtq", 2))
    calibrate(m, [torch.randn(8, 1, 28, 28)])
    spec = ModelSpec("mini_deit", {"depth": 1}, img_size=28, mean=[0.286], std=[0.353]).with_quant(m.vvtq_config)
    save_checkpoint(path, m.state_dict(), {**spec.to_dict(), "train_config": {"data": "fashion_mnist",
                                                                           "val_split": "test"}})
    return path


def test_export_onnx_modes_then_eval_onnx(tmp_path, capsys):
    """``vvtq export --onnx F --onnx-mode fast|qdq`` and ``vvtq eval --onnx F`` on the file's recorded dataset:
    the fast and exact files score what the integer runtime scores (50 images: at most one flip)."""
    ckpt = _quantized_checkpoint(tmp_path / "q.safetensors")
    for mode in ("fast", "qdq"):
        argv = ["export", str(ckpt), "--out", str(tmp_path / "q.vvtq.safetensors"), "--onnx",
                str(tmp_path / f"{mode}.onnx")] + (["--onnx-mode", mode] if mode == "qdq" else [])
        assert main(argv) == 0
        assert ("integer-kernel (fast) ONNX" if mode == "fast" else "exact QDQ ONNX") in capsys.readouterr().out
    assert main(["eval", "--packed", str(tmp_path / "q.vvtq.safetensors"), "--limit", "50"]) == 0
    ref = float(re.search(r"top-1 ([\d.]+)%", capsys.readouterr().out).group(1))
    for mode in ("fast", "qdq"):
        assert main(["--threads", "1", "eval", "--onnx", str(tmp_path / f"{mode}.onnx"), "--limit", "50"]) == 0
        out = capsys.readouterr().out
        assert f"{mode} ONNX" in out and "50 fashion_mnist images at 28 px" in out, out
        assert abs(float(re.search(r"top-1 ([\d.]+)%", out).group(1)) - ref) <= 2.0


class _Patchify(torch.nn.Module):
    """A tiny image model (conv, flatten) for ONNX files of a given channel count."""

    def __init__(self, chans: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(chans, 4, 4, 4)

    def forward(self, x):
        return self.conv(x).flatten(1)


def test_eval_onnx_refuses_bad_files_with_one_line(tmp_path, capsys):
    from vvtq.export.onnx import save_onnx

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    rgb = tmp_path / "rgb.onnx"  # a 3-channel model: Fashion-MNIST's images have one channel
    save_onnx(_Patchify(3).eval(), torch.zeros(2, 3, 28, 28), rgb, 18)
    recorded = tmp_path / "recorded.onnx"  # a 28 px graph that records 32 px as its input size
    save_onnx(_Patchify(1).eval(), torch.zeros(2, 1, 28, 28), recorded, 18,
              {"vvtq.img_size": "32", "vvtq.data": '"fashion_mnist"'})
    cases = [(bad, ["--data", "fashion_mnist"], "not an ONNX model onnxruntime can load"),
             (rgb, [], "records no dataset; pass --data"),
             (rgb, ["--data", "fashion_mnist"], "takes 3-channel 28x28 images; fashion_mnist gives 1-channel"),
             (recorded, [], "takes 28x28 images but records 32 px"),
             (tmp_path / "missing.onnx", ["--data", "fashion_mnist"], "no such file")]
    for path, extra, message in cases:
        assert main(["eval", "--onnx", str(path), "--limit", "4", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vvtq: error:") and message in err[0], err


def _checkpoint_with_spec_dataset(path: Path) -> Path:
    """A calibrated W2A2 mini DeiT checkpoint whose spec records its training set (as the training loop writes
    it) and which has no training settings at all."""
    import timm

    import vvtq.models  # noqa: F401
    from vvtq.checkpoint import save_checkpoint
    from vvtq.data.splits import train_val_datasets
    from vvtq.quant import QuantConfig, calibrate, quantize_model
    from vvtq.spec import ModelSpec

    torch.manual_seed(0)
    m = quantize_model(timm.create_model("mini_deit", depth=1), QuantConfig.preset("vvtq", 2))
    calibrate(m, [torch.randn(8, 1, 28, 28)])
    train, _ = train_val_datasets("fashion_mnist", None, "holdout", 100)
    spec = ModelSpec("mini_deit", {"depth": 1}, img_size=28, mean=[0.286], std=[0.353], dataset=train.identity())
    save_checkpoint(path, m.state_dict(), spec.with_quant(m.vvtq_config).to_dict())
    return path


def test_eval_and_export_take_the_dataset_from_the_spec(tmp_path, capsys):
    """``vvtq eval`` and ``vvtq export`` read the data, root, validation split and holdout from the spec."""
    from vvtq.export import read_packed

    ckpt = _checkpoint_with_spec_dataset(tmp_path / "q.safetensors")
    assert main(["eval", "--checkpoint", str(ckpt), "--limit", "20"]) == 0
    assert "(20 images)" in capsys.readouterr().out
    packed = tmp_path / "q.vvtq.safetensors"
    assert main(["export", str(ckpt), "--out", str(packed)]) == 0
    data = read_packed(packed).header["data"]
    assert (data["name"], data["split"], data["holdout"]) == ("fashion_mnist", "holdout", 100)
    assert data["root"] and Path(data["root"]).is_dir()
    assert main(["eval", "--packed", str(packed), "--limit", "20"]) == 0


def test_export_of_a_packed_file_names_what_it_is_and_what_reads_it(tmp_path, capsys):
    ckpt = _checkpoint_with_spec_dataset(tmp_path / "q.safetensors")
    packed = tmp_path / "q.vvtq.safetensors"
    assert main(["export", str(ckpt), "--out", str(packed)]) == 0
    capsys.readouterr()
    for argv in (["export", str(packed), "--out", str(tmp_path / "again.vvtq.safetensors")],
                 ["eval", "--checkpoint", str(packed)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a packed integer export" in err[0], err
        assert f"vvtq eval --packed {packed}" in err[0], err
    assert not (tmp_path / "again.vvtq.safetensors").exists()


def test_onnx_commands_without_the_onnx_extra_name_it(tmp_path, monkeypatch, capsys):
    import vvtq.export.onnx_runtime as ort_mod

    monkeypatch.setattr(ort_mod, "missing_onnx_packages", lambda: ["onnx", "onnxscript"])
    ckpt = tmp_path / "q.safetensors"  # never read: the check comes first
    for argv in (["export", str(ckpt), "--out", str(tmp_path / "q.vvtq.safetensors"), "--onnx", "m.onnx"],
                 ["eval", "--onnx", str(tmp_path / "m.onnx")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "needs onnx, onnxscript" in err[0] and "pip install 'vvtq[onnx]'" in err[0], err
