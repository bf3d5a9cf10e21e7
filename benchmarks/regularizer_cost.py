"""Cost of the oscillation-aware bin regularizer as a fraction of one QAT training step.

    python benchmarks/regularizer_cost.py            # deit_tiny, batch 16, 224 px, 2 threads, W2/W3/W4
    python benchmarks/regularizer_cost.py --quick    # mini_deit, a few steps (smoke test)

For each bit-width: the median time of a full training step (forward, backward, AdamW step) of the vvtq-converted
model, and, interleaved with it in the same run, the median time of the regularizer's forward + backward alone.
Writes benchmarks/results/regularizer_cost.json (summary.max_fraction = the largest regularizer/step fraction).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

import vvtq
from vvtq.qat.regularizer import bin_regularizer_loss

RESULTS = Path(__file__).parent / "results"


def _step_time(model, opt, x, y, reg: bool) -> float:
    t = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    if reg:
        loss = loss + 0.01 * bin_regularizer_loss(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def _reg_time(model) -> tuple[float, float]:
    """(forward, backward) seconds of the regularizer alone."""
    t0 = time.perf_counter()
    r = bin_regularizer_loss(model)
    t1 = time.perf_counter()
    r.backward()
    return t1 - t0, time.perf_counter() - t1


def measure(name: str, shape: tuple[int, ...], bits: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "in_chans": shape[1]} if name.startswith("mini") else {}
    model = timm.create_model(name, **kwargs)
    vvtq.quantize_model(model, vvtq.QuantConfig.preset("vvtq", wbits=bits, abits=bits))
    x = torch.randn(*shape)
    y = torch.randint(0, 10 if name.startswith("mini") else 1000, (shape[0],))
    vvtq.calibrate(model, [x])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    steps_t, fwd_t, bwd_t = [], [], []
    for i in range(warmup + steps):
        s = _step_time(model, opt, x, y, reg=False)
        opt.zero_grad(set_to_none=True)
        f, b = _reg_time(model)
        if i >= warmup:
            steps_t.append(s)
            fwd_t.append(f)
            bwd_t.append(b)
    step = statistics.median(steps_t)
    reg = statistics.median([f + b for f, b in zip(fwd_t, bwd_t, strict=True)])
    return {"model": name, "batch": shape[0], "img": shape[-1], "bits": bits, "step_s": step, "regularizer_s": reg,
            "regularizer_forward_s": statistics.median(fwd_t), "regularizer_backward_s": statistics.median(bwd_t),
            "fraction": reg / step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    name, shape = ("mini_deit", (128, 1, 28, 28)) if args.quick else ("deit_tiny_patch16_224", (16, 3, 224, 224))
    steps, warmup = (3, 1) if args.quick else (args.steps, 3)
    rows = []
    for bits in (2, 3, 4):
        row = measure(name, shape, bits, steps, warmup)
        rows.append(row)
        print(f"{name} W{bits}: step {row['step_s'] * 1e3:.0f} ms, regularizer fwd+bwd "
              f"{row['regularizer_s'] * 1e3:.1f} ms (forward {row['regularizer_forward_s'] * 1e3:.1f}) = "
              f"{100 * row['fraction']:.2f}% of the step", flush=True)
    out = {
        "command": "python " + " ".join(["benchmarks/regularizer_cost.py", *sys.argv[1:]]),
        "summary": {"max_fraction": max(r["fraction"] for r in rows), "target": 0.05, "model": name},
        "rows": rows,
        "machine": {"threads": args.threads, "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine()},
        "method": "median over steps after warm-up; the regularizer (8-bit ends skipped, as in training) timed "
                  "alone, interleaved with full steps of the same model in the same run",
    }
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "regularizer_cost.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"max fraction {100 * out['summary']['max_fraction']:.2f}%")


if __name__ == "__main__":
    main()
