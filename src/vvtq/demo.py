"""``vvtq demo``: quantize the shipped mini DeiT teacher to W2A2 with the vvtq recipe and compare with FP.

Steps: (1) the FP teacher: the checkpoint shipped in ``vvtq/assets`` (or, with ``--from-scratch``, one trained
now by its shipped recipe ``mini_deit_fp_cls``); (2) its test accuracy; (3) W2A2 QAT from it with the vvtq
recipe (the shipped ``demo_mini_deit_w2a2``: module-dependent quantizers at lr 1e-3, hard labels, the best W2A2
recipe of the accuracy study; a recipe with a live teacher gets the shipped teacher); (4) the packed integer
export of the W2A2 model, run by the integer runtime, and its agreement with the PyTorch model; its fast ONNX
export (integer kernels) run by onnxruntime, its agreement with the runtime and its latency against the FP
teacher's own ONNX (skipped, in one line, where the ``onnx`` extra is not installed); (5) a table of FP vs W2A2
test accuracy, size and time.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .evaluation import eval_loader, evaluate
from .export.onnx_runtime import ONNX_EXTRA_HINT, missing_onnx_packages
from .modelio import load_model
from .spec import data_source
from .train import TrainConfig, train

ASSET = Path(__file__).parent / "assets" / "mini_deit_fmnist.safetensors"
TEACHER_RECIPE, QAT_RECIPE = "mini_deit_fp_cls", "demo_mini_deit_w2a2"  # shipped in vvtq/recipes (package data)
QUICK = ["train_subset=512", "val_subset=1000", "epochs=1", "batch_size=64", "calib_batches=2", "log_every=4"]
QUICK_TEACHER = ["train_subset=2048", "val_subset=1000", "epochs=1", "batch_size=64", "warmup_epochs=0.2"]


def _describe(cfg: TrainConfig) -> str:
    """One line on what a QAT recipe does: its quantizers, labels, crops, regularizer and lr."""
    labels = f"soft labels of the {cfg.teacher.source} teacher" if cfg.teacher.distils else "hard labels"
    crops = f", {cfg.num_crops} crops an image" if cfg.num_crops > 1 else ""
    reg = ", bin regularizer" if cfg.regularizer else ""
    return f"{cfg.quant.preset} preset, {labels}{crops}{reg}, lr {cfg.lr:g}"


def model_size_bytes(model: torch.nn.Module) -> int:
    """Deployed size: quantized weights at their bit-width, everything else (and the scales) at FP32."""
    from .quant import iter_weight_quantizers

    quantized = {id(layer.weight): q.bits for layer, q in iter_weight_quantizers(model)}
    bits = sum(p.numel() * quantized.get(id(p), 32) for p in model.parameters())
    return bits // 8


def ship_teacher(src: str | Path, dst: str | Path = ASSET) -> Path:
    """Copy a trained FP checkpoint without its optimizer state (the small asset the demo starts from)."""
    ckpt = load_checkpoint(src)
    if ckpt["meta"].get("quant") is not None:
        raise CheckpointError(f"{src} is quantized; the demo's teacher is an FP checkpoint")
    meta = {k: v for k, v in ckpt["meta"].items() if k not in ("format", "version", "optimizer")}
    save_checkpoint(dst, ckpt["model"], meta)
    return Path(dst)


@torch.no_grad()
def _logits(fn, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of ``fn`` over a loader, on the CPU."""
    out, labels = [], []
    for x, y in loader:
        out.append(fn(x).float())
        labels.append(y)
    return torch.cat(out), torch.cat(labels)


def _fast_onnx(student, qmeta: dict, teacher, out_dir: Path, loader, test, img_size: int, batch: int = 64,
               reps: int = 20) -> dict:
    """Export the W2A2 model as fast ONNX (integer kernels) and the FP teacher as its own ONNX; the fast model's
    logits on the test set, and both files' onnxruntime latency on one batch, side by side (2 threads)."""
    from .export.onnx import export_onnx, save_onnx
    from .export.onnx_runtime import latency_ms, onnx_metadata, onnx_session, run_session

    fast, fp = out_dir / "model.fast.onnx", out_dir / "teacher.onnx"
    info = export_onnx(student, fast, img_size, mode="fast", metadata=onnx_metadata(qmeta))
    chans = next(iter(loader))[0].shape[1]
    save_onnx(teacher.cpu().float().eval(), torch.zeros(2, chans, img_size, img_size), fp, 21)
    sess = onnx_session(fast, threads=2)
    logits = torch.cat([run_session(sess, x) for x, _ in loader])
    x = torch.stack([loader.dataset[i % len(loader.dataset)][0] for i in range(batch)])
    ms = latency_ms({"fp": fp, "fast": fast}, x, reps=reps, threads=2)
    return {"logits": logits, "bytes": info["bytes"], "fp_ms": ms["fp"], "fast_ms": ms["fast"], "batch": batch,
            "reps": reps}


def run_demo(quick: bool = False, from_scratch: bool = False, out: str = "runs/demo", device: str = "auto") -> dict:
    """Run the demo and print its table; returns the numbers."""
    out_dir = Path(out)
    t0 = time.time()
    teacher_path, teacher_time = ASSET, None
    if from_scratch or not ASSET.is_file():
        if not from_scratch:
            print(f"no shipped teacher at {ASSET}; training one first (--from-scratch)")
        print(f"== 1/4  training the FP teacher (recipe {TEACHER_RECIPE})")
        sets = [f"out={out_dir / 'teacher'}", f"device={device}"] + (QUICK_TEACHER if quick else [])
        t = time.time()
        train(TrainConfig.from_recipe(TEACHER_RECIPE, sets))
        teacher_path, teacher_time = out_dir / "teacher" / "last.safetensors", time.time() - t
    else:
        print(f"== 1/4  FP teacher: {teacher_path.name} (shipped; `vvtq demo --from-scratch` retrains it)")

    teacher, meta = load_model(teacher_path, "cpu")
    from .data import SubsetImageDataset, build_dataset

    src = data_source(meta)
    test = build_dataset(src.data, "test", src.root)
    if quick:
        test = SubsetImageDataset(test, range(1000))
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    print(f"== 2/4  evaluating the FP teacher on {len(test)} test images")
    fp_acc = evaluate(teacher.to(dev), eval_loader(test, meta["img_size"]), dev)["acc"]

    sets = [f"out={out_dir / 'w2a2'}", f"init_from={teacher_path}", f"device={device}"] + (QUICK if quick else [])
    if TrainConfig.from_recipe(QAT_RECIPE, sets).teacher.source == "live":
        sets.append(f"teacher.checkpoint={teacher_path}")
    t = time.time()
    qat_cfg = TrainConfig.from_recipe(QAT_RECIPE, sets)
    print(f"== 3/4  W2A2 quantization-aware training ({QAT_RECIPE}): {_describe(qat_cfg)}")
    result = train(qat_cfg)
    qat_time = time.time() - t

    missing = missing_onnx_packages()  # the onnx extra: without it, the ONNX row is one line naming it
    print("== 4/4  packed integer export of the W2A2 model, run by the integer runtime (vvtq.export.runtime)"
          + ("" if missing else ", and its fast ONNX export, run by onnxruntime"))
    from .export import write_packed
    from .export.runtime import build_runtime, run_packed

    student, qmeta = load_model(out_dir / "w2a2" / "last.safetensors", "cpu")
    packed = out_dir / "w2a2" / "model.vvtq.safetensors"
    write_packed(student, qmeta, packed)
    runtime = build_runtime(packed)
    loader = eval_loader(test, meta["img_size"])
    y_model, labels = _logits(student, loader)  # eval mode, no grad: the model's integer-domain evaluation
    y_rt, _ = _logits(lambda x: run_packed(runtime, x), loader)
    q_acc = 100.0 * (y_model.argmax(1) == labels).float().mean().item()
    rt_acc = 100.0 * (y_rt.argmax(1) == labels).float().mean().item()
    agree = int((y_model.argmax(1) == y_rt.argmax(1)).sum())
    onnx = None if missing else _fast_onnx(student, qmeta, teacher, out_dir / "w2a2", loader, test, meta["img_size"])

    rows = [
        ("FP32 teacher", fp_acc, model_size_bytes(teacher),
         "shipped" if teacher_time is None else f"{teacher_time / 60:.1f} min"),
        ("W2A2 (vvtq)", q_acc, model_size_bytes(student), f"{qat_time / 60:.1f} min"),
        ("W2A2 packed", rt_acc, packed.stat().st_size, "exported"),
    ]
    if onnx is not None:
        rows.append(("W2A2 ONNX fast", 100.0 * (onnx["logits"].argmax(1) == labels).float().mean().item(),
                     onnx["bytes"], "exported"))
    _print_table(rows, None if onnx is not None else
                 f"skipped: {', '.join(missing)} not installed ({ONNX_EXTRA_HINT} adds them)")
    same = "identical logits" if torch.equal(y_model, y_rt) else \
        f"max logit difference {(y_model - y_rt).abs().max().item():.3g}"
    files = "the packed row is the file" if onnx is None else "the packed and ONNX rows are the files"
    print(f"\nInteger runtime vs PyTorch model: {agree}/{len(labels)} predictions agree ({same}). Sizes: FP32 and "
          f"W2A2 count parameters (weights at their bit-width); {files} on disk.")
    onnx_stats = {} if onnx is None else _print_onnx(onnx, y_rt)
    crops = result["step"] * qat_cfg.batch_size
    print(f"\nQAT budget: {crops} crops ({result['step']} steps). Test set: {len(test)} Fashion-MNIST images. "
          f"Total wall time {(time.time() - t0) / 60:.1f} min.")
    print(f"Checkpoints: {out_dir / 'w2a2' / 'last.safetensors'} (vvtq eval --checkpoint ...), metrics in "
          f"{out_dir / 'w2a2' / 'metrics.jsonl'}; packed export {packed} (vvtq eval --packed ...)")
    return {"fp_acc": fp_acc, "w2a2_acc": q_acc, "fp_bytes": rows[0][2], "w2a2_bytes": rows[1][2],
            "packed_acc": rt_acc, "packed_bytes": rows[2][2], "runtime_agreement": agree / len(labels),
            "onnx_agreement": onnx_stats.get("agreement"), "onnx_speed_ratio": onnx_stats.get("speed_ratio"),
            "qat_s": qat_time, "total_s": time.time() - t0}


def _print_table(rows: list[tuple[str, float, int, str]], onnx_skipped: str | None) -> None:
    """The results table; ``onnx_skipped``: why the ONNX row is missing, printed in its place."""
    print()
    print(f"{'model':<16}{'test top-1':>12}{'size':>12}{'train time':>14}")
    for name, acc, size, when in rows:
        print(f"{name:<16}{acc:>11.2f}%{size / 1e6:>10.3f} MB{when:>14}")
    if onnx_skipped:
        print(f"{'W2A2 ONNX fast':<16}{onnx_skipped}")


def _print_onnx(onnx: dict, y_rt: torch.Tensor) -> dict[str, float]:
    """The fast ONNX export's agreement with the integer runtime and its latency against the FP ONNX."""
    agree = int((onnx["logits"].argmax(1) == y_rt.argmax(1)).sum())
    print(f"Fast ONNX (integer kernels, onnxruntime) vs integer runtime: {agree}/{len(y_rt)} predictions "
          f"agree (max logit difference {(onnx['logits'] - y_rt).abs().max().item():.3g}). onnxruntime, 2 threads, "
          f"batch {onnx['batch']}, median of {onnx['reps']}, side by side: FP ONNX {onnx['fp_ms']:.1f} ms, W2A2 fast "
          f"ONNX {onnx['fast_ms']:.1f} ms ({onnx['fast_ms'] / onnx['fp_ms']:.2f}x).")
    return {"agreement": agree / len(y_rt), "speed_ratio": onnx["fast_ms"] / onnx["fp_ms"]}
