"""Fast ONNX export against the integer reference runtime, on the 10,000 Fashion-MNIST test images (issue #13).

    python benchmarks/onnx_agreement.py          # trains what is missing (runs/onnx_agreement/), then checks

Eight QAT-trained models: mini DeiT and mini Swin, W2A2 and W4A4, the `vvtq` and `lsq` presets, each trained for
40 steps from the study's FP teacher (`benchmarks/results/accuracy_v2_teachers/`) with

    vvtq --threads 1 train --config mini_{deit,swin}_w2a2_lsq --preset P --wbits B --abits B \\
        --init-from benchmarks/results/accuracy_v2_teachers/mini_{deit,swin}_fp.safetensors \\
        --set max_steps=40 --set val_subset=500 --set progress=false --out runs/onnx_agreement/{deit,swin}_wB_P

Each is packed and run by the integer runtime, exported with `mode="fast"` and run by onnxruntime (1 thread); the
JSON gives the predictions that agree, the largest logit difference and both top-1s.
Writes benchmarks/results/onnx_agreement.json.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "onnx_agreement"
TEACHERS = "benchmarks/results/accuracy_v2_teachers"
RUNS = [(m, b, p) for m in ("deit", "swin") for b in (2, 4) for p in ("vvtq", "lsq")]


def train(model: str, bits: int, preset: str) -> Path:
    out = WORK / f"{model}_w{bits}_{preset}"
    if not (out / "last.safetensors").is_file():
        cmd = [sys.executable, "-m", "vvtq", "--threads", "1", "train", "--config", f"mini_{model}_w2a2_lsq",
               "--preset", preset, "--wbits", str(bits), "--abits", str(bits), "--init-from",
               f"{TEACHERS}/mini_{model}_fp.safetensors", "--set", "max_steps=40", "--set", "val_subset=500",
               "--set", "progress=false", "--out", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def check(folder: Path) -> dict:
    from vvtq.data import build_dataset
    from vvtq.evaluation import eval_loader
    from vvtq.export import write_packed
    from vvtq.export.onnx import export_onnx
    from vvtq.export.onnx_runtime import onnx_session, run_session
    from vvtq.export.runtime import build_runtime, run_packed
    from vvtq.modelio import load_model

    t = time.time()
    model, meta = load_model(folder / "last.safetensors", "cpu")
    write_packed(model, meta, folder / "model.vvtq.safetensors")
    runtime = build_runtime(folder / "model.vvtq.safetensors")
    export_onnx(model, folder / "model.fast.onnx", meta["img_size"], mode="fast")
    session = onnx_session(folder / "model.fast.onnx", threads=1)
    ref, fast, labels = [], [], []
    for x, y in eval_loader(build_dataset("fashion_mnist", "test"), meta["img_size"]):
        with torch.no_grad():
            ref.append(run_packed(runtime, x))
        fast.append(run_session(session, x))
        labels.append(y)
    a, b, y = torch.cat(ref), torch.cat(fast), torch.cat(labels)
    return {"agree": int((a.argmax(1) == b.argmax(1)).sum()), "n": len(y),
            "max_logit_diff": (a - b).abs().max().item(),
            "runtime_top1": 100 * (a.argmax(1) == y).float().mean().item(),
            "onnx_top1": 100 * (b.argmax(1) == y).float().mean().item(), "s": round(time.time() - t, 1)}


def main() -> int:
    torch.set_num_threads(1)
    results = {}
    for model, bits, preset in RUNS:
        name = f"{model}_w{bits}_{preset}"
        results[name] = check(train(model, bits, preset))
        print(name, results[name], flush=True)
    worst = min(r["agree"] / r["n"] for r in results.values())
    doc = {"command": "python benchmarks/onnx_agreement.py", "summary": {
        "min_agreement": worst, "max_logit_diff": max(r["max_logit_diff"] for r in results.values())},
        "runs": results}
    (ROOT / "benchmarks" / "results" / "onnx_agreement.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
