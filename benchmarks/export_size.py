"""Export benchmark: packed size of DeiT-Tiny at W2A2, and agreement of the integer runtime and of ONNX with the
fake-quantized PyTorch models on the Fashion-MNIST test set.

- Size: ``deit_tiny_patch16_224`` (random init), vvtq preset W2A2, calibrated on 2 random batches; the packed file
  (format v2: codes zlib-coded where that is smaller, float32 FP remainder, exact; and the ``--fp16`` remainder,
  lossy) against the FP32 safetensors file of the model.
- Agreement: mini_deit and mini_swin at W2A2 and W4A4. Weights: with ``--checkpoints runs/accuracy``, the VVTQ
  QAT runs of the accuracy study (seed 0); otherwise the shipped FP teacher
  (``src/vvtq/assets/<model>_fmnist.safetensors``) where present, else random init, then ``quantize_model`` and
  ``calibrate`` on 4 training batches of 64 images (no QAT steps). Compared per test image: runtime vs the
  ordinary float32 fake-quant model (the headline ``summary.agreement``) and vs the same model in float64
  (``float64_reference``: same arithmetic up to rounding, so the exactness check); ONNX (onnxruntime, QDQ) vs the
  float32 model.

Writes ``benchmarks/results/export_size.json``. Single-threaded (the runtime is float64 on CPU: ~20 min in all).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "export_size.json"


def size_check(tmp: Path) -> dict:
    import timm
    from safetensors.torch import save_file

    from vvtq.export import read_packed, size_table, write_packed
    from vvtq.quant import QuantConfig, calibrate, quantize_model

    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224")
    fp32 = tmp / "deit_tiny_fp32.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(fp32))
    quantize_model(m, QuantConfig.preset("vvtq", 2))
    calibrate(m, [torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224)])
    meta = {"model": "deit_tiny_patch16_224", "model_kwargs": {}, "img_size": 224, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "classes": None, "quant": m.vvtq_config.to_dict()}
    out = {"model": "deit_tiny_patch16_224", "config": "vvtq W2A2 (8-bit patch embed / head)",
           "fp32_safetensors_bytes": fp32.stat().st_size}
    for tag, dt in (("float32", torch.float32), ("float16", torch.float16)):
        path = tmp / f"deit_tiny_{tag}.vvtq.safetensors"
        write_packed(m.eval(), meta, path, fp_dtype=dt)
        pf = read_packed(path)
        out[f"fp_{tag}"] = {"packed_bytes": path.stat().st_size,
                            "ratio": path.stat().st_size / out["fp32_safetensors_bytes"],
                            "compression": out["fp32_safetensors_bytes"] / path.stat().st_size,
                            "table": size_table(pf.header, pf.tensors, path.stat().st_size)}
    return out


def _model(name: str, bits: int, calib: torch.Tensor, checkpoints: str | None) -> tuple:
    """(quantized model, checkpoint metadata or None, weights source, calibration) of one agreement check."""
    import timm

    from vvtq.quant import QuantConfig, calibrate, quantize_model
    from vvtq.train.loop import load_model

    if checkpoints:  # a QAT-trained checkpoint of the accuracy study
        path = Path(checkpoints) / f"{name}_vvtq_w{bits}a{bits}_s0" / "last.safetensors"
        if not path.is_file():
            raise SystemExit(f"export_size: no checkpoint {path} (run benchmarks/accuracy.py first)")
        m, meta = load_model(path)
        return m.eval(), meta, f"VVTQ QAT {path.parent.name}", "learned in QAT"
    asset = ROOT / "src" / "vvtq" / "assets" / f"{name}_fmnist.safetensors"
    if asset.is_file():
        m, _ = load_model(asset)
        source = f"teacher {asset.name}"
    else:
        torch.manual_seed(0)
        m = timm.create_model(name)
        source = "random init"
    quantize_model(m, QuantConfig.preset("vvtq", bits))
    calibrate(m, calib.split(64))
    return m.eval(), None, source, "4 x 64 train images, no QAT"


def _batches(x: torch.Tensor, fn, bs: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def agreement(name: str, bits: int, limit: int | None, onnx_limit: int, tmp: Path,
              checkpoints: str | None = None) -> dict:
    from vvtq.data import EvalDataset, SubsetImageDataset, build_dataset
    from vvtq.export import write_packed
    from vvtq.export.runtime import build_runtime, float64_reference, run_packed

    img = 28 if name == "mini_deit" else 32
    train, test = build_dataset("fashion_mnist", "train"), build_dataset("fashion_mnist", "test")
    n = min(limit or len(test), len(test))
    cal = EvalDataset(SubsetImageDataset(train, range(256)), img)
    ev = EvalDataset(SubsetImageDataset(test, range(n)), img)
    calib = torch.stack([cal[i][0] for i in range(len(cal))])
    x = torch.stack([ev[i][0] for i in range(n)])
    labels = torch.tensor([ev[i][1] for i in range(n)])
    torch.set_num_threads(1)
    m, meta, source, calibration = _model(name, bits, calib, checkpoints)
    meta = meta or {"model": name, "model_kwargs": {}, "img_size": img, "mean": list(test.mean),
                    "std": list(test.std), "classes": list(test.classes), "quant": m.vvtq_config.to_dict()}
    path = tmp / f"{name}_w{bits}.vvtq.safetensors"
    write_packed(m, meta, path)
    t = time.time()
    rt = build_runtime(path)
    y_rt = _batches(x, lambda b: run_packed(rt, b))
    t_rt = time.time() - t
    ref = float64_reference(m)
    y64 = _batches(x, lambda b: ref(b.double()))
    y32 = _batches(x, lambda b: m(b).double())
    rng = (y64.max() - y64.min()).item()
    res = {"model": name, "bits": f"W{bits}A{bits}", "weights": source, "calibration": calibration,
           "images": n, "logit_range": rng, "runtime_s": t_rt,
           "vs_float64_fake_quant": {"agreement": (y_rt.argmax(1) == y64.argmax(1)).float().mean().item(),
                                     "max_abs_logit_diff": (y_rt - y64).abs().max().item()},
           "vs_float32_fake_quant": {"agreement": (y_rt.argmax(1) == y32.argmax(1)).float().mean().item(),
                                     "max_abs_logit_diff": (y_rt - y32).abs().max().item()},
           "acc_runtime": (y_rt.argmax(1) == labels).float().mean().item() * 100,
           "acc_float32_model": (y32.argmax(1) == labels).float().mean().item() * 100}
    if onnx_limit:
        from vvtq.export.onnx import export_onnx, run_onnx

        k = min(onnx_limit, n)
        onnx_path = tmp / f"{name}_w{bits}.onnx"
        export_onnx(m, onnx_path, img)
        y_onnx = _batches(x[:k], lambda b: run_onnx(onnx_path, b).double())
        res["onnx_vs_float32_fake_quant"] = {
            "images": k, "agreement": (y_onnx.argmax(1) == y32[:k].argmax(1)).float().mean().item(),
            "max_abs_logit_diff": (y_onnx - y32[:k]).abs().max().item()}
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="test images per model (default: all 10,000)")
    p.add_argument("--onnx-limit", type=int, default=10000, help="test images for the ONNX check")
    p.add_argument("--checkpoints", default=None,
                   help="accuracy-study folder: check its QAT-trained <model>_vvtq_w{2,4}a{2,4}_s0 runs instead "
                        "of calibrated-only models")
    p.add_argument("--jobs", type=int, default=1, help="agreement checks run at once, one thread each")
    p.add_argument("--models", nargs="+", default=["mini_deit", "mini_swin"], choices=["mini_deit", "mini_swin"],
                   help="agreement checks to (re)run; the others' results are kept from --out")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_size.py " + " ".join(sys.argv[1:])
    old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    result: dict = {"command": command.strip()}
    if len(args.models) < 2:
        result["command"] = f"{old.get('command', '')}; {command.strip()}".lstrip("; ")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result["size"] = size_check(tmp)
        print(json.dumps({k: v for k, v in result["size"].items() if k.startswith("fp_") is False}), flush=True)
        checks = [(name, bits, args.limit, args.onnx_limit, tmp, args.checkpoints)
                  for name in args.models for bits in (2, 4)]
        if args.jobs > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
                result["agreement"] = list(pool.map(agreement, *zip(*checks, strict=True)))
        else:
            result["agreement"] = [agreement(*c) for c in checks]
    kept = [a for a in old.get("agreement", []) if a["model"] not in args.models]
    result["agreement"] = sorted(kept + result["agreement"], key=lambda a: (a["model"], a["bits"]))
    ag = result["agreement"]
    onnx = [a["onnx_vs_float32_fake_quant"] for a in ag if "onnx_vs_float32_fake_quant" in a]
    result["summary"] = {
        "ratio": result["size"]["fp_float32"]["ratio"],
        "compression": result["size"]["fp_float32"]["compression"],
        "ratio_fp16_remainder": result["size"]["fp_float16"]["ratio"],
        "meets_1_12": result["size"]["fp_float32"]["ratio"] <= 1 / 12,
        # the headline: the runtime against the PyTorch fake-quant model as it runs (float32)
        "agreement": min(a["vs_float32_fake_quant"]["agreement"] for a in ag),
        "max_abs_logit_diff": max(a["vs_float32_fake_quant"]["max_abs_logit_diff"] for a in ag),
        "max_abs_logit_diff_over_range": max(a["vs_float32_fake_quant"]["max_abs_logit_diff"] / a["logit_range"]
                                             for a in ag),
        # the same model evaluated in float64 (same codes): the exactness of the integer arithmetic itself
        "agreement_vs_float64_reference": min(a["vs_float64_fake_quant"]["agreement"] for a in ag),
        "max_abs_logit_diff_vs_float64_reference": max(a["vs_float64_fake_quant"]["max_abs_logit_diff"]
                                                       for a in ag),
        "weights": sorted({a["weights"].split(" ")[0] + " " + a["calibration"] for a in ag}),
        "onnx_agreement": min((o["agreement"] for o in onnx), default=None),
        "onnx_max_abs_logit_diff": max((o["max_abs_logit_diff"] for o in onnx), default=None),
        "images": min(a["images"] for a in ag),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
