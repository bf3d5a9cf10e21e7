"""Prepared GPU check: QAT cost, a short multi-crop KD + regularizer training run, and the packed export, on CUDA.

    python benchmarks/gpu_check.py                          # on a CUDA machine; under 8 minutes on one H200
    python benchmarks/gpu_check.py --device cpu --quick     # the same path on mini models in a minute (a test runs it)

1. The bf16 step ratio, QAT (``vvtq`` preset, W2A2) over FP, for ``deit_tiny_patch16_224`` (batch 128) and
   ``swin_tiny_patch4_window7_224`` (batch 64): forward + backward + AdamW, interleaved, median after warm-up.
2. ``deit_tiny`` W2A2 trained for 50 steps with 4-crop KD from an FP teacher and the bin regularizer, on synthetic
   class-dependent images (no dataset can be downloaded there): the teacher first learns them for a few hundred
   steps; the check is that the QAT loss is finite everywhere and falls.
3. The trained model is exported (packed integers), run by the integer runtime, and its predictions compared with
   the model's own evaluation.

Writes one JSON (default ``benchmarks/results/gpu_check.json``; ``--quick``: ``runs/gpu_check_quick.json``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
FULL = {"ratio": [("deit_tiny_patch16_224", 128, 224), ("swin_tiny_patch4_window7_224", 64, 224)],
        "train": ("deit_tiny_patch16_224", 224), "teacher_steps": 300, "qat_steps": 50, "images": 4096,
        "timed": 20, "warmup": 5, "batch": 128}
QUICK = {"ratio": [("mini_deit", 32, 28), ("mini_swin", 16, 32)], "train": ("mini_deit", 28),
         "teacher_steps": 40, "qat_steps": 12, "images": 512, "timed": 3, "warmup": 1, "batch": 32}
NUM_CROPS, CLASSES = 4, 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _amp(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _model(name: str, in_chans: int, bits: int | None, x: torch.Tensor) -> torch.nn.Module:
    import vvtq

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=CLASSES, in_chans=in_chans).to(x.device)
    if bits is not None:
        vvtq.quantize_model(model, vvtq.QuantConfig.preset("vvtq", wbits=bits, abits=bits))
        vvtq.calibrate(model, [x[:8]])
    return model.train()


def step_ratio(name: str, batch: int, size: int, device: torch.device, timed: int, warmup: int) -> dict:
    """Median step times of FP and W2A2 QAT, interleaved so that a busy machine hits both alike."""
    in_chans = 1 if name.startswith("mini") else 3
    x = torch.randn(batch, in_chans, size, size, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    runs = {tag: _model(name, in_chans, bits, x) for tag, bits in (("fp", None), ("qat", 2))}
    opts = {tag: torch.optim.AdamW(m.parameters(), lr=1e-5) for tag, m in runs.items()}
    times: dict[str, list[float]] = {"fp": [], "qat": []}
    for i in range(warmup + timed):
        for tag, model in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            with _amp(device):
                loss = F.cross_entropy(model(x).float(), y)
            opts[tag].zero_grad(set_to_none=True)
            loss.backward()
            opts[tag].step()
            _sync(device)
            if i >= warmup:
                times[tag].append(time.perf_counter() - t0)
    fp_s, q_s = statistics.median(times["fp"]), statistics.median(times["qat"])
    return {"model": name, "batch": batch, "img": size, "bits": "W2A2", "fp_step_s": round(fp_s, 5),
            "qat_step_s": round(q_s, 5), "ratio": round(q_s / fp_s, 3)}


def synthetic_images(n: int, size: int, in_chans: int, seed: int = 0):
    """``n`` uint8 images of 10 classes: a smooth random pattern per class, shifted and noised per image."""
    from vvtq.data import ArrayImageDataset

    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(CLASSES, in_chans, 8, 8, generator=g), size=(size, size), mode="bilinear",
                           align_corners=False)
    labels = torch.arange(n) % CLASSES
    shift = torch.randint(-size // 8, size // 8 + 1, (n, 2), generator=g)
    imgs = torch.stack([torch.roll(protos[c], (int(s[0]), int(s[1])), (1, 2)) for c, s in zip(labels, shift,
                                                                                            strict=True)])
    imgs = (0.7 * imgs + 0.3 * torch.rand(imgs.shape, generator=g)).clamp(0, 1)
    return ArrayImageDataset((imgs * 255).round().to(torch.uint8), labels, [str(c) for c in range(CLASSES)],
                             name="synthetic", mean=[0.5] * in_chans, std=[0.25] * in_chans)


def train_check(name: str, size: int, device: torch.device, p: dict) -> dict:
    """FP teacher on synthetic images, then W2A2 QAT with 4-crop KD and the regularizer; then the packed export."""
    import vvtq
    from vvtq.data import MultiCropDataset, multicrop_collate
    from vvtq.distill import distill_loss
    from vvtq.export.format import read_packed
    from vvtq.export.runtime import build_runtime
    from vvtq.qat import BinRegularizer

    in_chans = 1 if name.startswith("mini") else 3
    data = synthetic_images(p["images"], size, in_chans)
    loader_kw = {"num_workers": 4 if device.type == "cuda" else 0, "collate_fn": multicrop_collate,
                 "shuffle": True, "drop_last": True, "generator": torch.Generator().manual_seed(0)}

    def batches(crops: int):
        views = MultiCropDataset(data, crops, size, (0.5, 1.0), seed=0)
        while True:
            yield from torch.utils.data.DataLoader(views, batch_size=p["batch"] // crops, **loader_kw)

    torch.manual_seed(0)
    teacher = timm.create_model(name, num_classes=CLASSES, in_chans=in_chans).to(device).train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3, weight_decay=0.05)
    t0, teacher_losses, it = time.time(), [], batches(1)
    for _ in range(p["teacher_steps"]):
        x, y = (t.to(device) for t in next(it)[:2])
        with _amp(device):
            loss = F.cross_entropy(teacher(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        teacher_losses.append(float(loss.detach()))
    teacher_s = time.time() - t0
    student = vvtq.build_model(name, {"num_classes": CLASSES, "in_chans": in_chans}).to(device)
    student.load_state_dict(teacher.state_dict())
    teacher.eval().requires_grad_(False)
    vvtq.quantize_model(student, vvtq.QuantConfig.preset("vvtq", wbits=2, abits=2))
    it = batches(NUM_CROPS)
    vvtq.calibrate(student, [next(it)[0].to(device) for _ in range(2)])
    student.train()
    reg = BinRegularizer(student, p["qat_steps"], lambda_max=0.01, start_frac=0.0)
    opt = torch.optim.AdamW(student.parameters(), lr=2e-4)
    t0, losses = time.time(), []
    for step in range(p["qat_steps"]):
        x, y = (t.to(device) for t in next(it)[:2])
        with _amp(device):
            with torch.no_grad():
                target = teacher(x).float().softmax(-1)
            loss = distill_loss(student(x), target) + reg(step)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite QAT loss at step {step}: {float(loss)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    qat_s = time.time() - t0
    k = max(1, len(losses) // 5)
    first, last = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])

    student.eval()
    x = torch.stack([MultiCropDataset(data, 1, size, (1.0, 1.0), seed=1)[i][0][0] for i in range(256)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.vvtq.safetensors"
        vvtq.export(student.cpu(), path, img_size=size, mean=list(data.mean), std=list(data.std),
                    classes=list(data.classes))
        size_bytes = path.stat().st_size
        runtime = build_runtime(read_packed(path))
    with torch.no_grad():
        ref = student(x).float()
        got = runtime(x).float()
    agree = float((ref.argmax(1) == got.argmax(1)).float().mean())
    return {"model": name, "img": size, "teacher_steps": p["teacher_steps"], "teacher_s": round(teacher_s, 1),
            "teacher_loss_first_last": [round(teacher_losses[0], 4), round(teacher_losses[-1], 4)],
            "qat_steps": p["qat_steps"], "crops_per_image": NUM_CROPS, "qat_s": round(qat_s, 1),
            "qat_loss_first": round(first, 4), "qat_loss_last": round(last, 4), "loss_finite": True,
            "loss_falls": last < first, "losses": [round(v, 4) for v in losses], "packed_bytes": size_bytes,
            "runtime_agreement": agree, "max_abs_logit_diff": float((ref - got).abs().max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="mini models, a few steps (the CPU smoke test)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here; run with --device cpu --quick for the smoke test",
              file=sys.stderr)
        return 2
    p = QUICK if args.quick else FULL
    t_start = time.time()
    ratios = []
    for name, batch, size in p["ratio"]:
        r = step_ratio(name, batch, size, device, p["timed"], p["warmup"])
        ratios.append(r)
        print(f"{name:30s} b{batch}: fp {r['fp_step_s'] * 1e3:.1f} ms  qat {r['qat_step_s'] * 1e3:.1f} ms  "
              f"ratio {r['ratio']:.2f}x", flush=True)
    train = train_check(*p["train"], device, p)
    print(f"QAT {train['model']}: loss {train['qat_loss_first']:.3f} -> {train['qat_loss_last']:.3f} in "
          f"{train['qat_steps']} steps; packed runtime agrees on {train['runtime_agreement']:.1%}", flush=True)
    ok = train["loss_falls"] and train["runtime_agreement"] >= 0.99
    doc = {"command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
           "ok": ok, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
           or platform.machine(), "quick": args.quick, "wall_s": round(time.time() - t_start, 1),
           "summary": {"max_ratio": max(r["ratio"] for r in ratios), "loss_falls": train["loss_falls"],
                       "runtime_agreement": train["runtime_agreement"]},
           "step_ratio": ratios, "train": train, "torch": torch.__version__, "timm": timm.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version()}
    out = Path(args.out or (ROOT / ("runs/gpu_check_quick.json" if args.quick else
                                    "benchmarks/results/gpu_check.json")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out} in {doc['wall_s']:.0f} s: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
