"""Cost of one QAT training step (forward + backward + AdamW step) of a vvtq-converted model vs the FP model.

    python benchmarks/step_cost.py            # full run: median of 20 steps, writes results/step_cost.json
    python benchmarks/step_cost.py --quick    # 5 steps, mini_deit only (a smoke run)

FP and quantized models are timed side by side in one process (interleaved), 2 threads.
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

CASES = {  # model -> (batch, input shape)
    "mini_deit": (128, (1, 28, 28)),
    "deit_tiny_patch16_224": (16, (3, 224, 224)),
}
BITS = (4, 2)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def _build(name: str, in_shape: tuple[int, ...], bits: int | None, x: torch.Tensor) -> torch.nn.Module:
    kw = {"in_chans": in_shape[0], "num_classes": 10} if name.startswith("mini") else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw)
    if bits is not None:
        vvtq.quantize_model(model, vvtq.QuantConfig.preset("vvtq", wbits=bits, abits=bits))
        vvtq.calibrate(model, [x[:8]])
    return model.train()


def bench(name: str, bits: int, steps: int, warmup: int) -> dict:
    batch, in_shape = CASES[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *in_shape, generator=gen)
    num_classes = 10 if name.startswith("mini") else 1000
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    fp = _build(name, in_shape, None, x)
    qm = _build(name, in_shape, bits, x)
    runs = {}
    for tag, model in (("fp", fp), ("quant", qm)):
        runs[tag] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), [])
    for _ in range(warmup):
        for model, opt, _times in runs.values():
            _step(model, opt, x, y)
    for _ in range(steps):  # interleaved, so that load from other processes hits both alike
        for model, opt, times in runs.values():
            times.append(_step(model, opt, x, y))
    fp_s = statistics.median(runs["fp"][2])
    q_s = statistics.median(runs["quant"][2])
    return {"model": name, "batch": batch, "input": list(in_shape), "bits": f"W{bits}A{bits}", "preset": "vvtq",
            "fp_step_s": round(fp_s, 4), "quant_step_s": round(q_s, 4), "ratio": round(q_s / fp_s, 3),
            "fp_times_s": [round(t, 4) for t in runs["fp"][2]],
            "quant_times_s": [round(t, 4) for t in runs["quant"][2]]}


def init_time(name: str = "deit_tiny_patch16_224") -> float:
    """Seconds for the MSE weight-scale initialisation of the whole model (no activations)."""
    model = timm.create_model(name, pretrained=False)
    vvtq.quantize_model(model, vvtq.QuantConfig.preset("vvtq", wbits=4, abits=4))
    t0 = time.perf_counter()
    with torch.no_grad():
        for layer, q in vvtq.iter_weight_quantizers(model):
            q.init_from_tensor(layer.weight)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="5 steps, mini_deit only, no JSON unless --out")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/step_cost.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    steps = 5 if args.quick and args.steps == 20 else args.steps
    models = args.models or (["mini_deit"] if args.quick else list(CASES))
    results = []
    for name in models:
        for bits in BITS:
            r = bench(name, bits, steps, 1 if args.quick else args.warmup)
            results.append(r)
            print(f"{name:24s} W{bits}A{bits}  fp {r['fp_step_s']:.3f}s  quant {r['quant_step_s']:.3f}s  "
                  f"ratio {r['ratio']:.2f}x", flush=True)
    init_s = init_time()
    print(f"deit_tiny weight-scale MSE init: {init_s:.2f}s")
    summary = {"max_ratio": max(r["ratio"] for r in results), "target_ratio": 1.4,
               "deit_tiny_weight_init_s": round(init_s, 3),
               "command": "python " + " ".join(["benchmarks/step_cost.py", *(argv or sys.argv[1:])]),
               "steps": steps, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "timm": timm.__version__, "python": platform.python_version(), "machine": platform.machine()}
    out = {"summary": summary, "results": results}
    if not args.quick or args.out:
        path = Path(args.out or Path(__file__).parent / "results" / "step_cost.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # keep hand-written notes across reruns
            old = json.loads(path.read_text()).get("summary", {})
            if "notes" in old:
                summary["notes"] = old["notes"]
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")
    print(f"max ratio {summary['max_ratio']:.2f}x (target 1.4x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
