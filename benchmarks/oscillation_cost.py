"""Cost of the oscillation tracker's ``step()`` as a fraction of one QAT training step (target < 5%).

    python benchmarks/oscillation_cost.py            # median of 20 steps after 3 warm-up steps, writes JSON
    python benchmarks/oscillation_cost.py --quick    # 5 steps, no JSON unless --out

mini_deit, vvtq preset W2A2, batch 128 of 28x28x1, 2 threads. Each iteration times one training step
(forward + backward + AdamW) and then the tracker's update of the same step, side by side, so that load
from other processes hits both alike. ``fraction = median(tracker) / median(train step)``. A second
tracker with iterative freezing (Nagel et al. §4.2) is timed the same way.
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
from vvtq.analysis import OscillationTracker

TARGET = 0.05


def _build(x: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("mini_deit", in_chans=1, num_classes=10)
    vvtq.quantize_model(model, vvtq.QuantConfig.preset("vvtq", wbits=2, abits=2))
    vvtq.calibrate(model, [x[:32]])
    return model.train()


def bench(steps: int, warmup: int, freeze: float | None) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (128,), generator=gen)
    model = _build(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = OscillationTracker(model, freeze_threshold=freeze)
    train_t, osc_t = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t1 = time.perf_counter()
        tracker.step()
        t2 = time.perf_counter()
        if i >= warmup:
            train_t.append(t1 - t0)
            osc_t.append(t2 - t1)
    tr, osc = statistics.median(train_t), statistics.median(osc_t)
    return {"tracker": "freeze" if freeze is not None else "track", "freeze_threshold": freeze,
            "layers": len(tracker.layers), "weights": sum(st.numel for st in tracker.layers.values()),
            "train_step_s": round(tr, 5), "tracker_step_s": round(osc, 6), "fraction": round(osc / tr, 5),
            "train_times_s": [round(t, 5) for t in train_t], "tracker_times_s": [round(t, 6) for t in osc_t],
            "final_oscillating": tracker.fractions()["overall"], "frozen": tracker.frozen_fraction()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="5 steps; no JSON unless --out")
    ap.add_argument("--out", default=None, help="JSON path (default: results/oscillation_cost.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    steps = 5 if args.quick and args.steps == 20 else args.steps
    results = [bench(steps, 1 if args.quick else args.warmup, None),
               bench(steps, 1 if args.quick else args.warmup, 0.02)]
    for r in results:
        print(f"{r['tracker']:7s} train step {r['train_step_s'] * 1e3:.1f} ms, "
              f"tracker {r['tracker_step_s'] * 1e3:.2f} ms: {100 * r['fraction']:.2f}% of a step", flush=True)
    summary = {"fraction": results[0]["fraction"], "fraction_with_freezing": results[1]["fraction"],
               "target": TARGET, "passed": results[0]["fraction"] < TARGET, "model": "mini_deit",
               "preset": "vvtq", "bits": "W2A2", "batch": 128,
               "input": [1, 28, 28], "steps": steps, "threads": torch.get_num_threads(),
               "command": "python " + " ".join(["benchmarks/oscillation_cost.py", *(argv or sys.argv[1:])]),
               "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
               "machine": platform.machine()}
    if not args.quick or args.out:
        path = Path(args.out or Path(__file__).parent / "results" / "oscillation_cost.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # keep hand-written notes across reruns
            old = json.loads(path.read_text()).get("summary", {})
            if "notes" in old:
                summary["notes"] = old["notes"]
        path.write_text(json.dumps({"summary": summary, "results": results}, indent=1) + "\n")
        print(f"wrote {path}")
    print(f"tracker cost {100 * summary['fraction']:.2f}% of a training step (target < {100 * TARGET:.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
