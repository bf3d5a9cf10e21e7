"""The training loop: FP and QAT runs, exact resume, SIGKILL safety, non-finite losses, torchrun parity."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vvtq.train import CheckpointError, TrainConfig, TrainingError, load_checkpoint, load_model, train

ROOT = Path(__file__).resolve().parents[2]
TINY = ["train_subset=256", "val_subset=200", "batch_size=32", "epochs=1", "log_every=1", "progress=false",
        "drop_path=0.0", "warmup_epochs=0.25"]
FP = "mini_deit_fp"  # a shipped recipe, by name
QAT = ["quant={preset: vvtq, wbits: 4, abits: 4}", "calib_batches=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _records(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == kind]


def _strip_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "time_s")} for r in records]


def test_fp_then_qat_from_it(tmp_path):
    fp = train(TrainConfig.from_yaml(FP, TINY + [f"out={tmp_path / 'fp'}"]))
    assert fp["step"] == 8 and 0 <= fp["final_acc"] <= 100
    ckpt = tmp_path / "fp" / "last.safetensors"
    qat = train(TrainConfig.from_yaml(FP, TINY + QAT + [
        f"out={tmp_path / 'q'}", f"init_from={ckpt}", "num_crops=2", f"teacher={{source: live, checkpoint: {ckpt}}}",
        "regularizer={lambda_max: 0.01}", "oscillation={every: 1}", "anneal={start_frac: 0.5}"]))
    assert qat["step"] == 16  # 2 crops an image: 16 images a batch
    model, meta = load_model(tmp_path / "q" / "last.safetensors")
    assert meta["quant"]["wbits"] == 4
    steps = _records(tmp_path / "q" / "metrics.jsonl", "step")
    assert "osc/overall" in steps[-1] and steps[-1]["reg/lambda"] > 0
    assert steps[-1]["cga/band"] < 0.01 and steps[-1]["cga/held"] > 0.9  # annealing: nearly every weight held
    # the quantized model evaluates to the accuracy the loop recorded
    assert _records(tmp_path / "q" / "metrics.jsonl", "epoch")[-1]["val_acc"] == pytest.approx(qat["final_acc"])


def test_single_crop_final_phase_takes_whole_batches_of_distinct_images(tmp_path, monkeypatch):
    """2 crops an image for the first 12 of 16 steps (16 images a batch), then one crop each of 32 images."""
    from vvtq.train import loop

    seen, real_step = [], loop._Run.train_step

    def spy(self, batch, epoch):
        seen.append((epoch, batch[3].tolist()))
        return real_step(self, batch, epoch)

    monkeypatch.setattr(loop._Run, "train_step", spy)
    cfg = TrainConfig.from_yaml(FP, TINY + ["num_crops=2", "single_crop_frac=0.25", f"out={tmp_path}"])
    assert train(cfg)["step"] == 16
    assert len(seen) == 16
    for i, (epoch, idx) in enumerate(seen):
        assert len(idx) == 32
        if i < 12:
            assert epoch == 0 and len(set(idx)) == 16 and idx[0::2] == idx[1::2]
        else:
            assert epoch == 1 and len(set(idx)) == 32
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl", "epoch")] == [12, 16]


def test_single_crop_phase_needs_several_crops():
    from vvtq.train import ConfigError

    with pytest.raises(ConfigError, match="single_crop_frac .* needs num_crops > 1; got num_crops=1"):
        TrainConfig.from_yaml(FP, ["single_crop_frac=0.2"])


def test_resume_inside_the_single_crop_phase_is_exact(tmp_path):
    sets = TINY + ["num_crops=2", "single_crop_frac=0.4", "ckpt_every_steps=1"]
    train(TrainConfig.from_yaml(FP, sets + [f"out={tmp_path / 'ref'}"]))
    train(TrainConfig.from_yaml(FP, sets + [f"out={tmp_path / 'run'}", "max_steps=13"]))  # 3 steps into phase 2
    assert load_checkpoint(tmp_path / "run" / "last.safetensors")["meta"]["step"] == 13
    train(TrainConfig.from_yaml(FP, sets + [f"out={tmp_path / 'run'}"]), resume=True)
    a, b = load_file(tmp_path / "ref" / "last.safetensors"), load_file(tmp_path / "run" / "last.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    ref, run = (_strip_times(_records(tmp_path / d / "metrics.jsonl", "step")) for d in ("ref", "run"))
    assert ref == run


def test_qat_keeps_the_fp_checkpoints_architecture(tmp_path):
    """A QAT recipe without model options builds the architecture its FP checkpoint records (here: avg pooling)."""
    train(TrainConfig.from_yaml(FP, TINY + ["max_steps=1", f"out={tmp_path / 'fp'}"]))
    ckpt = tmp_path / "fp" / "last.safetensors"
    train(TrainConfig.from_yaml(FP, TINY + QAT + ["model_kwargs={}", "max_steps=1", f"init_from={ckpt}",
                                                  f"out={tmp_path / 'q'}"]))
    model, meta = load_model(tmp_path / "q" / "last.safetensors")
    assert meta["model_kwargs"]["global_pool"] == "avg" and model.cls_token is None
    with pytest.raises(CheckpointError, match="holds model 'mini_deit', the recipe asks for 'mini_swin'"):
        train(TrainConfig.from_yaml(FP, TINY + QAT + ["model=mini_swin", f"init_from={ckpt}",
                                                      f"out={tmp_path / 's'}"]))


def test_qat_refuses_quantized_init(tmp_path):
    train(TrainConfig.from_yaml(FP, TINY + QAT + ["max_steps=1", f"out={tmp_path / 'q'}"]))
    with pytest.raises(CheckpointError, match="quantized checkpoint"):
        train(TrainConfig.from_yaml(FP, TINY + QAT + [f"init_from={tmp_path / 'q' / 'last.safetensors'}",
                                                    f"out={tmp_path / 'q2'}"]))


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    cfg = TrainConfig.from_yaml(FP, TINY + ["lr=1e30", "clip_grad=null", "ckpt_every_steps=1", "warmup_epochs=0",
                                           f"out={tmp_path}", "epochs=4"])
    with pytest.raises(TrainingError, match="non-finite loss"):
        train(cfg)
    kept = load_checkpoint(tmp_path / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


def test_resume_requires_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(TrainConfig.from_yaml(FP, TINY + [f"out={tmp_path}"]), resume=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vvtq", "--threads", "1", *args]


# Runs `vvtq train` in a child that SIGKILLs itself in the middle of writing the checkpoint of step KILL_AT_STEP
# (its temporary file half written, the rename not done): a real SIGKILL at a chosen point, not a timing race.
_KILL_CHILD = """
import json, os, signal, sys
from pathlib import Path
import vvtq.checkpoint as ck
from vvtq.cli import main

kill_at, real_save = int(os.environ["KILL_AT_STEP"]), ck.save_file

def save_file(tensors, filename, metadata=None):
    real_save(tensors, filename, metadata=metadata)
    if Path(filename).name.startswith(".last.safetensors.") and json.loads(metadata["vvtq"])["step"] == kill_at:
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

ck.save_file = save_file
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    """SIGKILL while the checkpoint of step 11 (in the second epoch) is being written: the checkpoint of step 10
    stays intact, and resuming from it gives the uninterrupted run's weights and metrics exactly."""
    sets = TINY + QAT + ["epochs=2", "ckpt_every_steps=1", "oscillation={every: 1}", "anneal={start_frac: 0.5}"]
    args = [a for s in sets for a in ("--set", s)]
    ref = tmp_path / "ref"
    subprocess.run(_cli("train", "--config", FP, "--out", str(ref), *args), check=True, env=ENV,
                   capture_output=True, timeout=300)
    run = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", _KILL_CHILD, "--threads", "1", "train", "--config", FP, "--out",
                            str(run), *args], env={**ENV, "KILL_AT_STEP": "11"}, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert list(run.glob(".last.safetensors.*.tmp")), "the child died before its half-written checkpoint"
    assert load_checkpoint(run / "last.safetensors")["meta"]["step"] == 10
    subprocess.run(_cli("train", "--config", FP, "--out", str(run), "--resume", *args), check=True, env=ENV,
                   capture_output=True, timeout=300)
    a, b = load_file(ref / "last.safetensors"), load_file(run / "last.safetensors")
    assert a.keys() == b.keys()
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differ, differ
    for kind in ("step", "epoch"):
        ref_records, run_records = _records(ref / "metrics.jsonl", kind), _records(run / "metrics.jsonl", kind)
        assert _strip_times(ref_records) == _strip_times(run_records)


def _torchrun(out: Path, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "vvtq", "--threads", "1", "train", "--config", FP, "--out", str(out), *args]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_torchrun_two_processes_match_one(tmp_path):
    """2-process DDP (gloo) = 1 process with the same global batch: loss trajectory within 1e-4 over 5 steps.

    FP training agrees over all 5 steps. Quantized training agrees over the first 2 steps only, though each step's
    maths is the same: the two gradient reduction orders differ in the last bit, and rounding to a few levels turns
    last-bit differences into a few flipped codes, which then grow (measured: W8A8 parts by 5e-5 at step 2 with lr
    2e-3 and agrees to 3e-7 at lr 1e-12; W4A32 parts by 2e-4 at step 5). For QAT the test also checks what DDP
    must guarantee: calibration gives every rank identical scales, equal to the single-process ones.
    """
    base = TINY + ["max_steps=5", "clip_grad=null"]
    for name, extra, steps in (("fp", [], 5), ("w4", ["quant={preset: vvtq, wbits: 4, abits: 32}"], 2),
                               ("w4a4", QAT, 2)):
        args = [a for s in base + extra for a in ("--set", s)]
        subprocess.run(_cli("train", "--config", FP, "--out", str(tmp_path / f"{name}1"), *args), check=True,
                       env=ENV, capture_output=True)
        _torchrun(tmp_path / f"{name}2", args)
        one, two = tmp_path / f"{name}1" / "metrics.jsonl", tmp_path / f"{name}2" / "metrics.jsonl"
        l1 = [r["loss"] for r in _records(one, "step")]
        l2 = [r["loss"] for r in _records(two, "step")]
        assert len(l1) == len(l2) == 5
        assert l1[:steps] == pytest.approx(l2[:steps], abs=1e-4), name
        if extra:
            digests = _records(two, "calibration")[0]["scale_digests"]
            assert len(digests) == 2 and digests[0] == digests[1]  # identical scales on every rank
            assert digests[0] == pytest.approx(_records(one, "calibration")[0]["scale_digests"][0], rel=1e-6)


def test_qat_from_precomputed_soft_labels(tmp_path):
    """Teacher source 'file': `vvtq softlabels` output replayed in training, refused for another dataset."""
    from vvtq.cli import main

    teacher = tmp_path / "fp"
    train(TrainConfig.from_yaml(FP, TINY + [f"out={teacher}", "max_steps=2"]))
    labels = tmp_path / "labels.safetensors"
    assert main(["--threads", "1", "softlabels", "--teacher", str(teacher / "last.safetensors"), "--out",
                 str(labels), "--crops", "4", "--top-k", "3", "--limit", "256", "--batch-size", "256"]) == 0
    from vvtq.distill import SoftLabelFile

    assert SoftLabelFile(labels).meta["scale"] == list(TrainConfig.from_yaml(FP).crop_scale)  # the teacher's crops
    narrow = tmp_path / "narrow.safetensors"
    assert main(["--threads", "1", "softlabels", "--teacher", str(teacher / "last.safetensors"), "--out", str(narrow),
                 "--crops", "1", "--limit", "8", "--crop-scale", "0.7", "1", "--crop-translate", "0.125"]) == 0
    assert SoftLabelFile(narrow).meta["scale"] == [0.7, 1.0] and SoftLabelFile(narrow).meta["translate"] == 0.125
    assert main(["--threads", "1", "softlabels", "--teacher", str(teacher / "last.safetensors"), "--out",
                 str(tmp_path / "bad.safetensors"), "--limit", "8", "--crop-scale", "0", "1"]) != 0
    assert not (tmp_path / "bad.safetensors").exists()
    sets = TINY + QAT + [f"init_from={teacher / 'last.safetensors'}", "num_crops=2",
                         f"teacher={{source: file, softlabels: {labels}}}", "max_steps=3"]
    result = train(TrainConfig.from_yaml(FP, sets + [f"out={tmp_path / 'q'}"]))
    assert result["step"] == 3
    assert all(r["loss"] > 0 for r in _records(tmp_path / "q" / "metrics.jsonl", "step"))
    with pytest.raises(ValueError, match="(?i)image|fingerprint|dataset"):
        train(TrainConfig.from_yaml(FP, sets + ["train_subset=128", f"out={tmp_path / 'q2'}"]))


def test_quantizer_parameters_get_their_own_lr():
    from vvtq.quant import QuantConfig, iter_quantizers, quantize_model
    from vvtq.train import build_model
    from vvtq.train.loop import param_groups

    model = quantize_model(build_model("mini_deit", {"num_classes": 10, "in_chans": 1}),
                           QuantConfig.preset("vvtq", wbits=2))
    groups = param_groups(model, 0.05, quant_lr_scale=0.1, weight_quant_lr_scale=0.0)
    act_ids = {id(p) for q in iter_quantizers(model) if not q.is_weight for p in q.parameters() if p.requires_grad}
    w_ids = {id(p) for q in iter_quantizers(model) if q.is_weight for p in q.parameters() if p.requires_grad}
    assert {id(p) for p in groups[2]["params"]} == act_ids and groups[2]["lr_mult"] == 0.1
    assert {id(p) for p in groups[3]["params"]} == w_ids and groups[3]["lr_mult"] == 0.0
    assert groups[2]["weight_decay"] == groups[3]["weight_decay"] == 0.0
    assert param_groups(model, 0.05, quant_lr_scale=0.1)[3]["lr_mult"] == 0.1
    everything = [id(p) for g in groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_ensemble_teacher_averages_probabilities_at_each_input_size(tmp_path):
    from vvtq.modelio import load_teacher

    train(TrainConfig.from_yaml(FP, TINY + ["max_steps=1", f"out={tmp_path / 'd'}"]))
    train(TrainConfig.from_yaml("mini_swin_fp", TINY + ["max_steps=1", f"out={tmp_path / 's'}"]))
    deit, swin = str(tmp_path / "d" / "last.safetensors"), str(tmp_path / "s" / "last.safetensors")
    single, both = load_teacher(deit, {}, torch.device("cpu")), load_teacher([deit, swin], {}, torch.device("cpu"))
    x = torch.randn(3, 1, 28, 28)
    p = single(x)
    assert torch.allclose(p.sum(-1), torch.ones(3)) and not any(t.requires_grad for t in both.parameters())
    d_model, s_model = load_model(deit)[0], load_model(swin)[0]
    x32 = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    want = (d_model(x).softmax(-1) + s_model(x32).softmax(-1)) / 2
    assert torch.allclose(both(x), want, atol=1e-6)
    with pytest.raises(CheckpointError, match="empty list"):
        load_teacher([], {}, torch.device("cpu"))


@pytest.mark.parametrize("override, message", [
    ("regularizer={lambda_mx: 0.1}", r"unknown key.*in regularizer: lambda_mx.*valid keys: lambda_max, start_frac"),
    ("quant={preset: vvtq, wbit: 2}", r"unknown key.*in quant: wbit .*valid keys: preset, overrides_file, wbits"),
    ("quant.gelu_sign=true", "unknown key.*in quant: gelu_sign"),
    ("quant=3", "setting 'quant' must be a mapping"),
    ("quant.wbits=9", "quant: wbits must be an integer in 2..8"),
    ("regularizer={units: bits}", "units must be one of"),
    ("oscillation={freeze: 0.1}", "unknown key.*in oscillation: freeze"),
    ("anneal={start: 0.5}", "unknown key.*in anneal: start .*did you mean 'start_frac'"),
    ("anneal={start_frac: 1}", r"start_frac must be in \[0, 1\)"),
    ("single_crop_frac=1", r"single_crop_frac must be in \[0, 1\)"),
    ("crop_translate=1", r"crop_translate must be in \[0, 1\)"),
    ("teacher={source: none, hard: 1}", "unknown key.*in teacher: hard"),
    ("teacher={source: none, hard_weight: 2}", r"hard_weight must be in \[0, 1\]"),
    ("teacher={source: none, checkpoint: T}", "teacher.checkpoint is set but teacher.source is none"),
    ("teacher={checkpoint: T}", "teacher.checkpoint is set but teacher.source is none"),  # source left out
    ("teacher={source: none, softlabels: L}", "teacher.softlabels is set but teacher.source is none"),
    ("quant_lr_scale=0", "quant_lr_scale must be positive"),
    ("holdout=-5", "holdout must be a number of images >= 0"),
    ("weight_quant_lr_scale=-1", "weight_quant_lr_scale not negative"),
])
def test_typos_in_sub_mappings_fail_before_any_data_is_read(override, message):
    from vvtq.train import ConfigError

    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml("mini_deit_w2a2_paper", [override])
