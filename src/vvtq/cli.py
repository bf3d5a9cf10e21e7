"""The ``vvtq`` command line: ``demo``, ``train``, ``recipes``, ``eval``, ``softlabels``, ``analyze``, ``export``.

Every expected failure (a ``VVTQError``: bad recipe or setting, bad bit-width, corrupt checkpoint, non-finite
loss; or an ``OSError``: a missing or unreadable file) prints one line ``vvtq: error: ...`` and exits with status
2; nothing already saved is touched. Anything else is a bug and keeps its traceback (``VVTQ_DEBUG=1`` shows the
traceback of the expected failures too).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from collections.abc import Callable

import torch

from .errors import ConfigError, VVTQError

EPILOG_TRAIN = """examples:
  vvtq recipes                                                        # the shipped recipes
  vvtq train --config mini_deit_fp                                    # FP teacher (a shipped recipe)
  vvtq train --config mini_deit_w2a2_vvtq                             # W2A2 QAT, the recipe we ship
  vvtq train --config mini_deit_w2a2_paper --wbits 3 --set regularizer.lambda_max=0.1   # the published one
  vvtq train --config my_recipe.yaml                                  # a recipe file of your own
  torchrun --nproc_per_node 2 -m vvtq train --config ...              # data-parallel (gloo on CPU)
  vvtq train --config ... --resume                                    # continue from OUT/last.safetensors
settings (--set KEY=VALUE, values parsed as YAML; a.b=v sets one key of a mapping):
{settings}"""


# ``vvtq train`` flags for common settings: (setting, argparse dest, type, help). Each one overrides the recipe
# and --set and goes through the same checks as ``--set setting=value``.
TRAIN_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("quant.preset", "preset", str, "quantizer preset: lsq or vvtq; on an FP recipe this turns QAT on"),
    ("quant.wbits", "wbits", int, "weight bit-width of the transformer blocks: 2..8, or 32"),
    ("quant.abits", "abits", int, "activation bit-width of the transformer blocks: 2..8, or 32"),
    ("epochs", "epochs", float, "passes over the training images"),
    ("lr", "lr", float, "peak learning rate"),
    ("batch_size", "batch_size", int, "crops per global batch"),
    ("seed", "seed", int, "random seed"),
    ("out", "out", str, "output folder: checkpoints, metrics.jsonl"),
    ("device", "device", str, "auto (default), cpu, cuda, cuda:1"),
    ("init_from", "init_from", str, "FP checkpoint the QAT run starts from"),
    ("teacher.checkpoint", "teacher", str, "distil from this FP checkpoint, run live (sets teacher.source=live)"),
)


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

    settings = {key: getattr(args, dest) for key, dest, _, _ in TRAIN_FLAGS if getattr(args, dest) is not None}
    if args.teacher is not None:
        settings["teacher.source"] = "live"
    if args.overrides_file:
        settings["quant.overrides_file"] = args.overrides_file
    cfg = TrainConfig.from_yaml(args.config, list(args.set or []), settings)
    if args.no_progress:
        cfg.progress = False
    result = train(cfg, resume=args.resume)
    _leave_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        if math.isnan(result["final_acc"]):  # stopped (max_steps) before any validation
            acc = f"not validated yet (`vvtq eval --checkpoint {cfg.out}/last.safetensors` scores it)"
        else:
            acc = f"final val acc {result['final_acc']:.2f}%, best {result['best_acc']:.2f}%"
        print(f"done: {result['step']} steps, {acc}, {result['wall_s'] / 60:.1f} min; checkpoint "
              f"{cfg.out}/last.safetensors")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data.splits import eval_split
    from .device import resolve_device
    from .evaluation import eval_loader, evaluate
    from .modelio import load_models
    from .spec import data_source

    device = resolve_device(args.device)
    if args.flip and (args.packed or args.onnx):
        raise ConfigError("--flip averages a checkpoint's probabilities; --packed and --onnx files run as they are")
    if args.packed:
        from .export.runtime import evaluate_packed

        acc = evaluate_packed(args.packed, args.data, args.data_root, args.split, args.limit)
        print(f"{args.packed}: top-1 {acc:.2f}% (integer reference runtime)")
        return 0
    if args.onnx:
        from .export.onnx_runtime import evaluate_onnx, require_onnx

        require_onnx("vvtq eval --onnx")
        r = evaluate_onnx(args.onnx, args.data, args.data_root, args.split, args.limit,
                          threads=args.threads or torch.get_num_threads())
        kind = f", {r['mode']} ONNX" if r["mode"] else ""
        print(f"{args.onnx}: top-1 {r['acc']:.2f}% (onnxruntime{kind}; {r['images']} {r['data']} images at "
              f"{r['img_size']} px)")
        return 0
    if not args.checkpoint:
        raise ConfigError("vvtq eval needs --checkpoint CKPT, --packed FILE or --onnx FILE")
    model, meta = load_models(args.checkpoint, device, flip=args.flip)
    src = data_source(meta).given(args.data, args.data_root, args.split)
    if not src.data:
        raise ConfigError(f"{args.checkpoint[0]} records no dataset; pass --data")
    base = eval_split(src.data, src.val_split, src.root, src.holdout)
    if args.limit:
        from .data import SubsetImageDataset

        base = SubsetImageDataset(base, range(min(args.limit, len(base))))
    m = evaluate(model, eval_loader(base, meta["img_size"]), device)
    kind = "FP" if meta.get("quant") is None else f"W{meta['quant']['wbits']}A{meta['quant']['abits']}"
    kind = kind if len(args.checkpoint) == 1 else f"mean of {len(args.checkpoint)} FP models'"
    kind += " (image and mirror)" if args.flip else ""
    print(f"{' + '.join(args.checkpoint)}: {kind} top-1 {m['acc']:.2f}%  loss {m['loss']:.4f}  ({len(base)} images)")
    return 0


def cmd_softlabels(args: argparse.Namespace) -> int:
    from .data.splits import training_images
    from .device import resolve_device
    from .distill import generate_softlabels
    from .modelio import load_models
    from .spec import data_source

    device = resolve_device(args.device)
    teacher, meta = load_models(args.teacher, device)
    src = data_source(meta).given(args.data, args.data_root, holdout=args.holdout)
    if not src.data:
        raise ConfigError(f"{args.teacher[0]} records no dataset; pass --data")
    base = training_images(src.data, src.root, src.holdout)
    if args.limit:
        from .data import SubsetImageDataset

        base = SubsetImageDataset(base, range(min(args.limit, len(base))))

    recorded = meta.get("train_config") or {}
    scale = args.crop_scale or recorded.get("crop_scale") or (0.35, 1.0)
    translate = recorded.get("crop_translate", 0.0) if args.crop_translate is None else args.crop_translate
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"--crop-scale must be LO HI with 0 < LO <= HI <= 1; got {' '.join(map(str, scale))}")
    if not 0 <= translate < 1:
        raise ConfigError(f"--crop-translate must be in [0, 1) (a fraction of the image side); got {translate}")
    generate_softlabels(teacher, base, args.out, device=device, num_crops_per_image=args.crops, top_k=args.top_k,
                        out_size=args.img_size or meta["img_size"], mean=meta["mean"], std=meta["std"],
                        seed=args.seed, batch_size=args.batch_size, progress=True, scale=tuple(scale),
                        translate=float(translate), flip=args.flip, amp=args.amp)
    shift = f" shifted by up to {translate:g}" if translate else ""
    shift += ", each labelled with its mirror" if args.flip else ""
    print(f"wrote {args.out}: {len(base)} images x {args.crops} crops of area {scale[0]:g}-{scale[1]:g}{shift}, "
          f"top-{args.top_k}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .recipes import list_recipes, recipe_text

    if args.name:
        print(recipe_text(args.name), end="")
        return 0
    rows = list_recipes()
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")
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
    t.add_argument("--config", required=True, metavar="RECIPE",
                   help="a shipped recipe's name (`vvtq recipes` lists them) or a recipe YAML file; a file that "
                   "exists wins")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe setting (repeatable)")
    common = t.add_argument_group("common settings", "each overrides the recipe (and --set) and is checked like "
                                  "--set KEY=VALUE")
    for key, dest, kind, text in TRAIN_FLAGS:
        common.add_argument(f"--{dest.replace('_', '-')}", dest=dest, type=kind, metavar=key.split(".")[-1].upper(),
                            help=f"{text} ({key})")
    t.add_argument("--overrides-file", help="mixed-precision QuantConfig overrides (from vvtq analyze)")
    t.add_argument("--resume", action="store_true", help="continue bit-exactly from OUT/last.safetensors")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="top-1 accuracy of a checkpoint, a packed export or an ONNX file")
    e.add_argument("--checkpoint", nargs="+", metavar="CKPT", help="a vvtq checkpoint (.safetensors); several FP "
                   "ones: their ensemble (the mean of their probabilities)")
    e.add_argument("--packed", help="a packed export (.vvtq.safetensors) run by the integer runtime")
    e.add_argument("--onnx", help="an ONNX file run by onnxruntime (CPU; --threads sets its threads); dataset, split "
                   "and normalisation: the ones the file records, unless given")
    e.add_argument("--data", help="dataset: fashion_mnist or an image-folder root (default: the checkpoint's)")
    e.add_argument("--data-root", help="directory of the dataset files")
    e.add_argument("--split", help="split (default: the checkpoint's validation split)")
    e.add_argument("--limit", type=int, help="evaluate the first N images only")
    e.add_argument("--flip", action="store_true", help="test-time augmentation: the mean of the probabilities for "
                   "each image and its mirror (FP checkpoints)")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("softlabels", help="precompute a teacher's multi-crop soft labels (FKD-style)")
    s.add_argument("--teacher", required=True, nargs="+", metavar="CKPT", help="FP teacher checkpoint; several: "
                   "their ensemble (the mean of their probabilities; dataset and input size: the first's)")
    s.add_argument("--out", required=True, help="output .safetensors file")
    s.add_argument("--crops", type=int, default=50, help="crops stored per image (M)")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--img-size", type=int, help="crop size (default: the teacher's)")
    s.add_argument("--crop-scale", type=float, nargs=2, metavar=("LO", "HI"),
                   help="area fraction of the random crops (default: the teacher's own training crops)")
    s.add_argument("--crop-translate", type=float, metavar="FRAC",
                   help="shift of the crops, a fraction of the image side (default: the teacher's own)")
    s.add_argument("--data", help="dataset (default: the teacher's)")
    s.add_argument("--data-root")
    s.add_argument("--limit", type=int, help="first N training images only")
    s.add_argument("--holdout", type=int, help="training images held out, as in the QAT recipe (default: the "
                   "teacher's own holdout)")
    s.add_argument("--flip", action="store_true", help="label each crop by the mean of the teacher's probabilities "
                   "for it and its mirror (test-time augmentation)")
    s.add_argument("--amp", choices=("fp32", "bf16"), default="fp32", help="bf16: the teacher under bf16 autocast "
                   "on channels-last batches (about 2x faster for a CNN on a CPU)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=512)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_softlabels)

    r = sub.add_parser("recipes", help="list the shipped recipes (or print one)")
    r.add_argument("name", nargs="?", help="print this recipe's YAML (copy it to make your own)")
    r.set_defaults(func=cmd_recipes)

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
    x.add_argument("--onnx", help="also write an ONNX model to this path")
    x.add_argument("--onnx-mode", choices=("fast", "qdq"), default="fast",
                   help="fast (default): integer kernels in onnxruntime (MatMulIntegerToFloat), agrees with the "
                   "integer runtime up to float rounding at code thresholds; qdq: QuantizeLinear/DequantizeLinear "
                   "around float kernels, the runtime's arithmetic")
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
    except (VVTQError, OSError) as exc:
        if os.environ.get("VVTQ_DEBUG"):
            raise
        print(f"vvtq: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
