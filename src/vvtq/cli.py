"""The ``vvtq`` command line: ``demo``, ``train``, ``eval``, ``softlabels``, ``analyze``, ``export``.

Every expected failure (bad path, bad bit-width, corrupt checkpoint, non-finite loss) prints one line
``vvtq: error: ...`` and exits with status 2; nothing already saved is touched.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable

import torch

EPILOG_TRAIN = """examples:
  vvtq train --config configs/mini_deit_fp.yaml                       # FP teacher
  vvtq train --config configs/mini_deit_w2a2_vvtq.yaml                # W2A2 QAT, multi-crop KD + regularizer
  vvtq train --config configs/mini_deit_w2a2_vvtq.yaml --set epochs=2 --set quant.wbits=3
  torchrun --nproc_per_node 2 -m vvtq train --config ...              # data-parallel (gloo on CPU)
  vvtq train --config ... --resume                                    # continue from OUT/last.safetensors
settings (--set KEY=VALUE, values parsed as YAML; a.b=v sets one key of a mapping):
{settings}"""


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def _leave_process_group() -> None:
    """After a torchrun job: wait for every rank, then shut the process group down before the interpreter exits
    (leaving it to exit-time destructors can abort a rank whose peer is still writing its checkpoint)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    overrides = list(args.set or [])
    for key in ("out", "epochs", "device", "seed"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.overrides_file:
        overrides.append(f"quant.overrides_file={args.overrides_file}")
    cfg = TrainConfig.from_yaml(args.config, overrides)
    if args.no_progress:
        cfg.progress = False
    result = train(cfg, resume=args.resume)
    _leave_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result['step']} steps, final val acc {result['final_acc']:.2f}%, best "
              f"{result['best_acc']:.2f}%, {result['wall_s'] / 60:.1f} min; checkpoint {cfg.out}/last.safetensors")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data.splits import eval_split
    from .train.loop import eval_loader, evaluate, load_model, resolve_device

    device = resolve_device(args.device)
    if args.packed:
        from .export.runtime import evaluate_packed

        acc = evaluate_packed(args.packed, args.data, args.data_root, args.split, args.limit)
        print(f"{args.packed}: top-1 {acc:.2f}% (integer reference runtime)")
        return 0
    if not args.checkpoint:
        raise ValueError("vvtq eval needs --checkpoint CKPT or --packed FILE")
    model, meta = load_model(args.checkpoint, device)
    data = args.data or meta["train_config"]["data"]
    root = args.data_root or meta["train_config"].get("data_root")
    split = args.split or meta["train_config"].get("val_split", "test")
    base = eval_split(data, split, root, meta["train_config"].get("holdout", 0))
    if args.limit:
        from .data import SubsetImageDataset

        base = SubsetImageDataset(base, range(min(args.limit, len(base))))
    m = evaluate(model, eval_loader(base, meta["img_size"]), device)
    kind = "FP" if meta.get("quant") is None else f"W{meta['quant']['wbits']}A{meta['quant']['abits']}"
    print(f"{args.checkpoint}: {kind} top-1 {m['acc']:.2f}%  loss {m['loss']:.4f}  ({len(base)} images)")
    return 0


def cmd_softlabels(args: argparse.Namespace) -> int:
    from .data.splits import training_images
    from .distill import generate_softlabels
    from .train.loop import load_model, resolve_device

    device = resolve_device(args.device)
    teacher, meta = load_model(args.teacher, device)
    tc = meta["train_config"]
    holdout = tc.get("holdout", 0) if args.holdout is None else args.holdout
    base = training_images(args.data or tc["data"], args.data_root or tc.get("data_root"), holdout)
    if args.limit:
        from .data import SubsetImageDataset

        base = SubsetImageDataset(base, range(min(args.limit, len(base))))

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return teacher(x.to(device)).float().cpu()

    generate_softlabels(run, base, args.out, num_crops_per_image=args.crops, top_k=args.top_k,
                        out_size=args.img_size or meta["img_size"], mean=meta["mean"], std=meta["std"],
                        seed=args.seed, batch_size=args.batch_size, progress=True)
    print(f"wrote {args.out}: {len(base)} images x {args.crops} crops, top-{args.top_k}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(quick=args.quick, from_scratch=args.from_scratch, out=args.out, device=args.device)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis.report import run_analyze

    run_analyze(args)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export.cli import run_export

    run_export(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vvtq", description="Low-bit quantization-aware training of Vision "
                                "Transformers (variation-aware ViT quantization).")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = p.add_subparsers(dest="command", required=True)

    from .train.config import settings_help

    t = sub.add_parser("train", help="train a recipe (FP teacher or QAT)",
                       epilog=EPILOG_TRAIN.format(settings=textwrap.fill(settings_help(), 118, break_long_words=False)),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", required=True, help="recipe YAML file (see configs/)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe setting (repeatable)")
    t.add_argument("--out", help="output folder (checkpoints, metrics.jsonl)")
    t.add_argument("--epochs", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    t.add_argument("--overrides-file", help="mixed-precision QuantConfig overrides (from vvtq analyze)")
    t.add_argument("--resume", action="store_true", help="continue bit-exactly from OUT/last.safetensors")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="top-1 accuracy of a checkpoint or a packed export")
    e.add_argument("--checkpoint", help="a vvtq checkpoint (.safetensors)")
    e.add_argument("--packed", help="a packed export (.vvtq.safetensors) run by the integer runtime")
    e.add_argument("--data", help="dataset: fashion_mnist or an image-folder root (default: the checkpoint's)")
    e.add_argument("--data-root", help="directory of the dataset files")
    e.add_argument("--split", help="split (default: the checkpoint's validation split)")
    e.add_argument("--limit", type=int, help="evaluate the first N images only")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("softlabels", help="precompute a teacher's multi-crop soft labels (FKD-style)")
    s.add_argument("--teacher", required=True, help="FP teacher checkpoint")
    s.add_argument("--out", required=True, help="output .safetensors file")
    s.add_argument("--crops", type=int, default=50, help="crops stored per image (M)")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--img-size", type=int, help="crop size (default: the teacher's)")
    s.add_argument("--data", help="dataset (default: the teacher's)")
    s.add_argument("--data-root")
    s.add_argument("--limit", type=int, help="first N training images only")
    s.add_argument("--holdout", type=int, help="training images held out, as in the QAT recipe (default: the "
                   "teacher's own holdout)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=512)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_softlabels)

    d = sub.add_parser("demo", help="quantize the shipped mini DeiT teacher to W2A2 and compare with FP")
    d.add_argument("--quick", action="store_true", help="a tiny version (< 2 minutes), for tests")
    d.add_argument("--from-scratch", action="store_true", help="retrain the FP teacher first")
    d.add_argument("--out", default="runs/demo", help="output folder")
    d.add_argument("--device", default="auto")
    d.set_defaults(func=cmd_demo)

    _add_analyze(sub)
    _add_export(sub)
    return p


def _add_analyze(sub) -> None:
    a = sub.add_parser("analyze", help="variation report: sensitivity, statistics, oscillation, mixed precision")
    a.add_argument("--checkpoint", required=True, help="checkpoint to analyse (FP or quantized)")
    a.add_argument("--compare", help="a second checkpoint to compare with (e.g. the FP teacher)")
    a.add_argument("--data", help="dataset (default: the checkpoint's)")
    a.add_argument("--data-root")
    a.add_argument("--out", required=True, help="output folder for report.md, report.html and plots")
    a.add_argument("--bits", type=int, default=2, help="bit-width for the sensitivity sweep")
    a.add_argument("--calib-images", type=int, default=512, help="images for activation statistics")
    a.add_argument("--eval-images", type=int, default=1000, help="images for sensitivity")
    a.add_argument("--metrics", help="a training run's metrics.jsonl for oscillation curves")
    a.add_argument("--bit-budget", type=float, help="propose a mixed-precision assignment at this average "
                   "weight bit-width; writes OUT/mixed_precision.yaml")
    a.add_argument("--bit-choices", type=int, nargs="+", default=None, metavar="B",
                   help="weight bit-widths the mixed-precision search may use (default: 2 3 4 8)")
    a.add_argument("--device", default="auto")
    a.set_defaults(func=cmd_analyze)


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="pack a quantized checkpoint into integers (and ONNX)")
    x.add_argument("checkpoint", help="a quantized vvtq checkpoint")
    x.add_argument("--out", required=True, help="output file, e.g. model.vvtq.safetensors")
    x.add_argument("--onnx", help="also write a QDQ ONNX model to this path")
    x.add_argument("--fp16", action="store_true", help="store the FP remainder (LayerNorm, biases, tokens) as "
                   "float16: smaller, but no longer bit-matching the float32 model")
    x.set_defaults(func=cmd_export)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _threads(args.threads)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("vvtq: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        if os.environ.get("VVTQ_DEBUG"):
            raise
        print(f"vvtq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
