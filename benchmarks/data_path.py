"""What the CIFAR-10 image-folder path costs per image, against the training step it feeds.

    python benchmarks/data_path.py                      # ../shared/data/cifar10, 512 images, writes JSON
    python benchmarks/data_path.py --root DIR --images 256 --out /tmp/x.json

Per image, medians of repeated passes over the same images, in one process: decoding the JPEG (PIL, what an
ImageNet folder costs on every read without the cache), reading it from the in-memory decode cache, and the
random-resized crop + flip + normalisation of a training view; then the training step per image of the CIFAR-10
teacher (``cifar_resnet``, batch 256, channels-last, bf16 autocast) and of the mini DeiT student (batch 128,
fp32). The ratio that matters: the loader's share of a step, with and without the cache (the loop loads in the
training process, ``num_workers: 0``).

The same steps say which CIFAR-10 recipes use ``channels_last`` and ``amp: bf16``: the teacher's step in fp32
(NCHW and channels-last) and both students' steps in fp32 and bf16, side by side in one process.
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

import vvtq  # noqa: F401  (registers the models)
from vvtq.data import ImageFolderDataset, MultiCropDataset

RESULTS = Path(__file__).parent / "results"


def _per_image(fn, n: int, repeats: int) -> float:
    """Median over ``repeats`` passes of the seconds ``fn(i)`` takes per image, for i in range(n)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def _step_per_image(name: str, kwargs: dict, batch: int, channels_last: bool, bf16: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times) / batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="../shared/data/cifar10")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.images
    nocache = ImageFolderDataset(args.root, "train", cache_bytes=0)
    cached = ImageFolderDataset(args.root, "train")
    for i in range(n):
        cached.get_image(i)  # fill the cache
    views = MultiCropDataset(cached, 1, 32, (0.35, 1.0))
    decode = _per_image(nocache.get_image, n, args.repeats)
    from_cache = _per_image(cached.get_image, n, args.repeats)
    view = _per_image(views.__getitem__, n, args.repeats)  # from the cache: cache read + crop + normalise
    teacher = _step_per_image("cifar_resnet", {}, 256, True, True, args.steps)
    deit = {"img_size": 32, "in_chans": 3, "global_pool": "avg", "class_token": False}
    student = _step_per_image("mini_deit", deit, 128, False, False, args.steps)
    speed = {  # step time per image, fp32 over the recipe's setting: >1 means the setting is faster
        "teacher_bf16_channels_last_vs_fp32_nchw": _step_per_image("cifar_resnet", {}, 256, False, False,
                                                                   args.steps) / teacher,
        "teacher_bf16_channels_last_vs_fp32_channels_last": _step_per_image("cifar_resnet", {}, 256, True, False,
                                                                            args.steps) / teacher,
        "mini_deit_fp32_vs_bf16": student / _step_per_image("mini_deit", deit, 128, False, True, args.steps),
        "mini_swin_fp32_vs_bf16": _step_per_image("mini_swin", {"in_chans": 3}, 128, False, False, args.steps)
        / _step_per_image("mini_swin", {"in_chans": 3}, 128, False, True, args.steps)}
    rows = {"decode_us": decode * 1e6, "cache_read_us": from_cache * 1e6, "cached_view_us": view * 1e6,
            "uncached_view_us": (view - from_cache + decode) * 1e6,
            "teacher_step_us_per_image": teacher * 1e6, "student_step_us_per_image": student * 1e6}
    share = {f"{who}_{mode}": v / (v + step) for who, step in (("teacher", teacher), ("student", student))
             for mode, v in (("cached", view), ("uncached", view - from_cache + decode))}
    out = {"command": "python " + " ".join(["benchmarks/data_path.py", *sys.argv[1:]]),
           "per_image": {k: round(v, 1) for k, v in rows.items()},
           "loader_share_of_step": {k: round(v, 4) for k, v in share.items()},
           "speedup": {k: round(v, 2) for k, v in speed.items()},
           "machine": {"threads": args.threads, "torch": torch.__version__, "cpu": platform.machine()},
           "method": f"medians of {args.repeats} passes over {n} training images; steps: median of {args.steps}"}
    for k, v in out["per_image"].items():
        print(f"{k:28s} {v:9.1f} us")
    for k, v in out["loader_share_of_step"].items():
        print(f"loader share, {k:18s} {100 * v:5.1f}%")
    for k, v in out["speedup"].items():
        print(f"speed-up {k:48s} {v:5.2f}x")
    path = Path(args.out) if args.out else RESULTS / "data_path.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
