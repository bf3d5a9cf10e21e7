"""Export benchmark: packed size of DeiT-Tiny at W2A2, and agreement of the integer runtime and of ONNX with the
fake-quantized PyTorch models on the Fashion-MNIST test set.

- Size: ``deit_tiny_patch16_224`` (random init), vvtq preset W2A2, calibrated on 2 random batches; the packed file
  (format v2: codes zlib-coded where that is smaller, float32 FP remainder, exact; and the ``--fp16`` remainder,
  lossy) against the FP32 safetensors file of the model.
- Agreement: mini_deit and mini_swin at W2A2 and W4A4. Weights: with ``--checkpoints runs/accuracy``, the VVTQ
  QAT runs of the accuracy study (seed 0); otherwise the shipped FP teacher
  (``src/vvtq/assets/<model>_fmnist.safetensors``) where present, else random init, then ``quantize_model`` and
  ``calibrate`` on 4 training batches of 64 images (no QAT steps). Compared per test image:
  - the float32 runtime vs the PyTorch model as it evaluates (``vvtq eval``: eval mode, integer domain; the
    headline ``summary.agreement`` and ``max_abs_logit_diff``);
  - the float32 runtime vs the plain fake-quant float32 model (``x_hat @ W_hat^T``, ``set_integer_eval(m, False)``):
    how far float32 rounding alone moves predictions;
  - the float64 runtime vs the plain fake-quant model in float64 (``float64_reference``): the integer formulas
    checked against the fake-quant maths by independent code;
  - ONNX (onnxruntime, QDQ) vs the PyTorch model.

Writes ``benchmarks/results/export_size.json``. Single-threaded per check (``--jobs`` checks at once).
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

    from vvtq.export import export_model, read_packed, size_table
    from vvtq.quant import QuantConfig, calibrate, quantize_model

    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224")
    fp32 = tmp / "deit_tiny_fp32.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(fp32))
    quantize_model(m, QuantConfig.preset("vvtq", 2))
    calibrate(m, [torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224)])
    out = {"model": "deit_tiny_patch16_224", "config": "vvtq W2A2 (8-bit patch embed / head)",
           "fp32_safetensors_bytes": fp32.stat().st_size}
    for tag, dt in (("float32", torch.float32), ("float16", torch.float16)):
        path = tmp / f"deit_tiny_{tag}.vvtq.safetensors"
        export_model(m.eval(), path, fp16=dt == torch.float16)  # the spec timm's config of the model implies
        pf = read_packed(path)
        out[f"fp_{tag}"] = {"packed_bytes": path.stat().st_size,
                            "ratio": path.stat().st_size / out["fp32_safetensors_bytes"],
                            "compression": out["fp32_safetensors_bytes"] / path.stat().st_size,
                            "table": size_table(pf.header, pf.tensors, path.stat().st_size)}
    return out


def _model(name: str, bits: int, calib: torch.Tensor, checkpoints: str | None) -> tuple:
    """(quantized model, checkpoint metadata or None, weights source, calibration) of one agreement check."""
    import timm

    from vvtq.modelio import load_model
    from vvtq.quant import QuantConfig, calibrate, quantize_model

    if checkpoints:  # a QAT-trained checkpoint of the accuracy study
        path = Path(checkpoints) / f"{name}_vvtq_w{bits}a{bits}_s0" / "last.safetensors"
        if not path.is_file():
            raise SystemExit(f"export_size: no checkpoint {path} (a QAT run folder, e.g. from vvtq train)")
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
    from vvtq.export import export_model
    from vvtq.export.runtime import build_runtime, float64_reference, run_packed
    from vvtq.quant import set_integer_eval
    from vvtq.spec import ModelSpec

    img = 28 if name == "mini_deit" else 32
    train, test = build_dataset("fashion_mnist", "train"), build_dataset("fashion_mnist", "test")
    n = min(limit or len(test), len(test))
    cal = EvalDataset(SubsetImageDataset(train, range(256)), img)
    ev = EvalDataset(SubsetImageDataset(test, range(n)), img)
    calib = torch.stack([cal[i][0] for i in range(len(cal))])
    x = torch.stack([ev[i][0] for i in range(n)])
    labels = torch.tensor([ev[i][1] for i in range(n)])
    torch.set_num_threads(1)
    m, _, source, calibration = _model(name, bits, calib, checkpoints)
    spec = getattr(m, "vvtq_spec", None) or ModelSpec(name, img_size=img, mean=list(test.mean),
                                                      std=list(test.std), classes=list(test.classes))
    path = tmp / f"{name}_w{bits}.vvtq.safetensors"
    export_model(m, path, spec=spec)
    t = time.time()
    rt = build_runtime(path)
    y_rt = _batches(x, lambda b: run_packed(rt, b))
    t_rt = time.time() - t
    t = time.time()
    y_model = _batches(x, m)  # eval mode, no grad: the integer domain, as `vvtq eval` measures
    t_model = time.time() - t
    t = time.time()
    y_plain = _batches(x, set_integer_eval(m, False))
    t_plain = time.time() - t
    set_integer_eval(m, True)
    rt64 = build_runtime(path, dtype=torch.float64)
    y_rt64 = _batches(x, lambda b: run_packed(rt64, b))
    ref = float64_reference(m)
    y64 = _batches(x, lambda b: ref(b.double()))

    def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
        return {"agreement": (a.argmax(1) == b.argmax(1)).float().mean().item(),
                "differing_images": int((a.argmax(1) != b.argmax(1)).sum()),
                "max_abs_logit_diff": (a.double() - b.double()).abs().max().item()}

    res = {"model": name, "bits": f"W{bits}A{bits}", "weights": source, "calibration": calibration,
           "images": n, "logit_range": (y_model.max() - y_model.min()).item(),
           "seconds": {"runtime": t_rt, "model_integer_eval": t_model, "model_fake_quant_eval": t_plain},
           "vs_model": compare(y_rt, y_model),
           "vs_plain_fake_quant_float32": compare(y_rt, y_plain),
           "float64_runtime_vs_float64_fake_quant": compare(y_rt64, y64),
           "acc_runtime": (y_rt.argmax(1) == labels).float().mean().item() * 100,
           "acc_model": (y_model.argmax(1) == labels).float().mean().item() * 100,
           "acc_plain_fake_quant_float32": (y_plain.argmax(1) == labels).float().mean().item() * 100}
    if onnx_limit:
        from vvtq.export.onnx import export_onnx, run_onnx

        k = min(onnx_limit, n)
        onnx_path = tmp / f"{name}_w{bits}.onnx"
        export_onnx(m, onnx_path, img)
        y_onnx = _batches(x[:k], lambda b: run_onnx(onnx_path, b))
        res["onnx_vs_model"] = {"images": k, **compare(y_onnx, y_model[:k])}
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
        # one fresh process per check, so that each check's memory goes back to the system when it ends
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
            result["agreement"] = list(pool.map(agreement, *zip(*checks, strict=True)))
    kept = [a for a in old.get("agreement", []) if a["model"] not in args.models]
    result["agreement"] = sorted(kept + result["agreement"], key=lambda a: (a["model"], a["bits"]))
    ag = result["agreement"]
    onnx = [a["onnx_vs_model"] for a in ag if "onnx_vs_model" in a]
    result["summary"] = {
        "ratio": result["size"]["fp_float32"]["ratio"],
        "compression": result["size"]["fp_float32"]["compression"],
        "ratio_fp16_remainder": result["size"]["fp_float16"]["ratio"],
        "meets_1_12": result["size"]["fp_float32"]["ratio"] <= 1 / 12,
        # the headline: the runtime against the PyTorch model as it evaluates (`vvtq eval`)
        "agreement": min(a["vs_model"]["agreement"] for a in ag),
        "max_abs_logit_diff": max(a["vs_model"]["max_abs_logit_diff"] for a in ag),
        "max_abs_logit_diff_over_range": max(a["vs_model"]["max_abs_logit_diff"] / a["logit_range"] for a in ag),
        # against the plain fake-quant float32 forward: float32 rounding alone flips rare near-tie codes
        "agreement_vs_plain_fake_quant_float32": min(a["vs_plain_fake_quant_float32"]["agreement"] for a in ag),
        # float64 runtime vs float64 fake-quant model (independent formulas): the integer maths itself
        "agreement_float64": min(a["float64_runtime_vs_float64_fake_quant"]["agreement"] for a in ag),
        "max_abs_logit_diff_float64": max(a["float64_runtime_vs_float64_fake_quant"]["max_abs_logit_diff"]
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
