"""How far apart two models' top-1 can land by the choice of images alone.

    python benchmarks/pair_disagreement.py A.safetensors B.safetensors [--holdout 5000]

Scores both checkpoints on the held-out training images and on the test set and prints, per split, both top-1,
their difference and the images the two disagree on. If neither model is better, the difference is a sum of +1 / -1
over the disagreeing images only, so its standard error is ``sqrt(disagreements) / images`` (McNemar's test in
its normal approximation). The accuracy study's findings quote it to say which differences a split can resolve.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from vvtq import eval_loader, load_model
from vvtq.data.splits import eval_split


def _predictions(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    preds, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            preds.append(model(x).argmax(1))
            labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def compare(a: str, b: str, data: str = "fashion_mnist", root: str | None = None, holdout: int = 5000,
            splits: tuple[str, ...] = ("holdout", "test")) -> list[dict[str, Any]]:
    """Per split: images, both top-1 (%), their difference, the disagreements and the difference's standard error."""
    (ma, meta_a), (mb, meta_b) = (load_model(path) for path in (a, b))
    if meta_a["img_size"] != meta_b["img_size"]:
        raise ValueError(f"the two models take images of {meta_a['img_size']} and {meta_b['img_size']} px")
    rows = []
    for split in splits:
        loader = eval_loader(eval_split(data, split, root, holdout=holdout), meta_a["img_size"])
        (pa, y), (pb, _) = _predictions(ma, loader), _predictions(mb, loader)
        n, d = len(y), int((pa != pb).sum())
        acc_a, acc_b = (100 * (p == y).double().mean().item() for p in (pa, pb))
        rows.append({"split": split, "images": n, "top1": [acc_a, acc_b], "difference": acc_a - acc_b,
                     "disagree": d, "se": 100 * d ** 0.5 / n})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--root", default=None)
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        rows = compare(args.a, args.b, args.data, args.root, args.holdout)
    except ValueError as exc:
        raise SystemExit(f"pair_disagreement: {exc}") from None
    for r in rows:
        print(f"{r['split']}: {r['images']} images, top-1 {r['top1'][0]:.2f} / {r['top1'][1]:.2f}, difference "
              f"{r['difference']:+.2f}; they disagree on {r['disagree']} ({100 * r['disagree'] / r['images']:.1f}%): "
              f"standard error of the difference {r['se']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
