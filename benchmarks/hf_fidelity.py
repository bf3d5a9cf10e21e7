"""W8 fidelity of Hugging Face ``transformers`` models quantized by vvtq, and a short W2A2 run.

    python benchmarks/hf_fidelity.py                 # writes benchmarks/results/hf_fidelity.json
    python benchmarks/hf_fidelity.py --steps 20      # a quicker W2A2 run

For each family (ViT, DeiT, DeiT with its distillation head, Swin, DINOv2 with a GELU MLP and with SwiGLU) a
*tiny random-init* config (no download: width 64 / Swin 32, 4 layers / Swin [2, 2], 32 px, 10 classes; weights at
ordinary scale, not HF's std-0.02 init) is quantized at W8 (wbits = abits = 8, edge 8, ``vvtq`` preset),
calibrated on 64 CIFAR-10 test images (``../shared/data/cifar10``; Gaussian noise where it is missing), and
compared with its FP logits on 256 other images: cosine of the logits, max |difference|, top-1 agreement. Then a
tiny ViT is trained at W2A2 for ``--steps`` steps on 32 px CIFAR-10 crops (hard labels, AdamW): the loss of the
first and last 10 steps. The quantizers are the timm blocks' (Huang, Shen, Cheng 2023, §3.2).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as T

import vvtq
from vvtq.hf import HFClassifier

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
OUT = ROOT / "benchmarks" / "results" / "hf_fidelity.json"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def config(family: str):
    common = {"image_size": 32, "num_channels": 3, "num_labels": 10}
    if family == "swin":
        return T.SwinConfig(embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4, patch_size=2, **common)
    vit = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "patch_size": 4, **common}
    if family.startswith("dinov2"):
        return T.Dinov2Config(mlp_ratio=4, use_swiglu_ffn=family == "dinov2_swiglu", layerscale_value=0.5, **vit)
    return (T.DeiTConfig if family.startswith("deit") else T.ViTConfig)(intermediate_size=256, **vit)


CLASSES = {"vit": T.ViTForImageClassification, "deit": T.DeiTForImageClassification,
           "deit_teacher": T.DeiTForImageClassificationWithTeacher, "swin": T.SwinForImageClassification,
           "dinov2": T.Dinov2ForImageClassification, "dinov2_swiglu": T.Dinov2ForImageClassification}


def tiny(family: str, seed: int = 0) -> HFClassifier:
    torch.manual_seed(seed)
    model = CLASSES[family](config(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "position" not in name:
                torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
            elif "relative_position_bias_table" in name or "position_embeddings" in name:
                torch.nn.init.normal_(p, std=0.2)
    return HFClassifier(model).eval()


def cifar(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` normalised 32 px images and labels of CIFAR-10 ``split`` (a fixed random choice), or noise."""
    if not (CIFAR / split).is_dir():
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "gaussian noise"
    from vvtq.data import EvalDataset, SubsetImageDataset, build_dataset

    base = build_dataset("image_folder", split, root=str(CIFAR))
    idx = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    ds = EvalDataset(SubsetImageDataset(base, idx), 32, MEAN, STD)
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.tensor(ys), f"CIFAR-10 {split} (../shared/data/cifar10)"


def fidelity(family: str, calib: torch.Tensor, test: torch.Tensor) -> dict:
    model = tiny(family)
    with torch.no_grad():
        ref = model(test)
    vvtq.quantize_model(model, vvtq.QuantConfig.preset("vvtq", wbits=8, abits=8, edge_bits=8))
    vvtq.calibrate(model, [calib])
    model.eval()
    with torch.no_grad():
        y = model(test)
    return {"class": type(model.hf).__name__, "params": sum(p.numel() for p in model.parameters()),
            "cosine": round(F.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item(), 6),
            "max_abs_diff": round((y - ref).abs().max().item(), 5),
            "top1_agreement": round((y.argmax(1) == ref.argmax(1)).float().mean().item(), 4)}


def w2a2_run(steps: int, batch: int = 64) -> dict:
    x, y, source = cifar("train", 4096, seed=1)
    model = tiny("vit", seed=1)
    vvtq.quantize_model(model, vvtq.QuantConfig.preset("vvtq", wbits=2, abits=2))
    vvtq.calibrate(model, [x[:256]])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    losses, t0 = [], time.time()
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        xb = x[i]
        if torch.rand((), generator=g) < 0.5:
            xb = xb.flip(-1)
        loss = F.cross_entropy(model(xb), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    k = min(10, steps)
    return {"family": "vit", "data": source, "steps": steps, "batch": batch, "lr": 1e-3,
            "loss_first10": round(sum(losses[:k]) / k, 4), "loss_last10": round(sum(losses[-k:]) / k, 4),
            "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="W2A2 training steps")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    calib, _, source = cifar("val", 64, seed=0)
    test, _, _ = cifar("val", 320, seed=0)
    test = test[64:]
    families = {f: fidelity(f, calib, test) for f in CLASSES}
    for f, r in families.items():
        print(f"{f:14s} cosine {r['cosine']:.6f}  max|diff| {r['max_abs_diff']:.4f}  top-1 agree "
              f"{r['top1_agreement']:.4f}", flush=True)
    run = w2a2_run(args.steps) if args.steps else None
    if run:
        print(f"W2A2 ViT: loss {run['loss_first10']} -> {run['loss_last10']} in {run['steps']} steps", flush=True)
    result = {
        "command": "python " + " ".join(["benchmarks/hf_fidelity.py", *sys.argv[1:]]),
        "what": "W8 (wbits=abits=8, edge 8, vvtq preset) logits vs FP for transformers' image classifiers",
        "models": "tiny random-init configs built here (no pretrained weights): width 64 (Swin 32), 4 layers "
                  "(Swin [2, 2]), 32 px, 10 classes; weights at ordinary scale",
        "images": f"calibration 64, comparison 256: {source}",
        "families": families, "w2a2_run": run,
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": T.__version__, "machine": platform.machine(), "argv": sys.argv[1:]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
