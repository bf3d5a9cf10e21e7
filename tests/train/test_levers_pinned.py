"""Every QAT lever, pinned: a short W2A2 run of a shipped recipe with each lever on ends with the weights recorded
in ``levers_pinned.json``. A refactor of how the levers are wired must leave these runs unchanged, to the bit, so
that studies started before it stay comparable.

The runs use the eager fake-quant kernels. Bit-exact where the CPU's vector capability is the one the reference
was recorded on (float sums may round differently on another instruction set); close (relative 1e-4 per tensor
sum) elsewhere. Rewrite the reference, only for a change meant to alter training, with
``python tests/train/test_levers_pinned.py --write``.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Path(__file__).with_name("levers_pinned.json")
TEACHER = ROOT / "src" / "vvtq" / "assets" / "mini_deit_fmnist.safetensors"
RECIPE = "mini_deit_w2a2_paper"  # shipped: 4-crop KD from a live teacher and the bin regularizer
COMMON = ["train_subset=256", "val_subset=64", "batch_size=32", "epochs=1", "max_steps=6", "log_every=1",
          "progress=false", "calib_batches=1", "warmup_epochs=0.1", f"init_from={TEACHER}", "eval_every=100"]
CASES = {
    "live_teacher_regularizer": [f"teacher={{source: live, checkpoint: {TEACHER}}}",
                                 "regularizer={lambda_max: 0.01, start_frac: 0.25}"],
    "hard_labels_freeze": ["teacher={source: none}", "num_crops=1",
                           "oscillation={every: 1, momentum: 0.5, freeze_threshold: 0.02}"],
    "hard_weight_anneal": [f"teacher={{source: live, checkpoint: {TEACHER}, hard_weight: 0.3}}", "num_crops=2",
                           "anneal={start_frac: 0.3}"],
    "anneal_then_freeze": ["teacher={source: none}", "num_crops=1", "anneal={start_frac: 0.3}",
                           "oscillation={every: 1, momentum: 0.5, freeze_threshold: 0.02}",
                           "regularizer={lambda_max: 0.1, start_frac: 0.0}"],
    "softlabel_file": ["teacher={source: file, softlabels: LABELS}", "num_crops=2",
                       "regularizer={lambda_max: 0.01, start_frac: 0.0, units: step, bins: group}"],
}


def _weights_after(case: str, tmp: Path) -> dict[str, torch.Tensor]:
    """The weights a run of ``case`` ends with, on the eager fake-quant kernels (whatever mode another test
    left)."""
    from vvtq.quant import fused_kernels

    with fused_kernels("0"):
        return _run(case, tmp)


def _run(case: str, tmp: Path) -> dict[str, torch.Tensor]:
    from vvtq.train import TrainConfig, train

    sets = list(CASES[case])
    if case == "softlabel_file":
        from vvtq.cli import main

        labels = tmp / "labels.safetensors"
        if not labels.exists():
            assert main(["--threads", "1", "softlabels", "--teacher", str(TEACHER), "--out", str(labels),
                         "--crops", "4", "--top-k", "3", "--limit", "256", "--batch-size", "128",
                         "--crop-scale", "0.35", "1"]) == 0  # the crops pinned (the default is now the teacher's)
        sets = [s.replace("LABELS", str(labels)) for s in sets]
    out = tmp / case
    train(TrainConfig.from_recipe(RECIPE, COMMON + sets + [f"out={out}"]))
    from vvtq.checkpoint import load_checkpoint

    return load_checkpoint(out / "last.safetensors")["model"]


def _record(state: dict[str, torch.Tensor]) -> dict:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().contiguous().cpu().numpy().tobytes())
    sums = {k: float(v.double().sum()) for k, v in sorted(state.items()) if v.is_floating_point()}
    return {"sha256": h.hexdigest(), "sums": sums}


def _capability() -> str:
    return str(torch.backends.cpu.get_cpu_capability())


@pytest.mark.parametrize("case", sorted(CASES))
def test_lever_run_ends_with_the_pinned_weights(case, tmp_path):
    ref = json.loads(REFERENCE.read_text())
    got = _record(_weights_after(case, tmp_path))
    want = ref["cases"][case]
    if ref["cpu_capability"] == _capability() and ref["torch"] == torch.__version__:
        assert got["sha256"] == want["sha256"], f"{case}: the weights changed (to the bit)"
    assert set(got["sums"]) == set(want["sums"])
    for k, v in want["sums"].items():
        assert got["sums"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), f"{case}: {k}"


if __name__ == "__main__":  # python tests/train/test_levers_pinned.py --write
    import tempfile

    if "--write" not in sys.argv:
        sys.exit("usage: python tests/train/test_levers_pinned.py --write  (rewrites the reference)")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        cases = {c: _record(_weights_after(c, Path(d))) for c in sorted(CASES)}
    REFERENCE.write_text(json.dumps({"cpu_capability": _capability(), "torch": torch.__version__,
                                     "cases": cases}, indent=1) + "\n")
    print(f"wrote {REFERENCE}")
