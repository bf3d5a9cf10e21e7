"""The CIFAR-10 study (issue #27): does the method help where it claims to, a strong teacher and a student that 2 bits
hurt? W2A2 recipes against the LSQ baseline on mini DeiT and mini Swin, 32 px RGB photographs.

    python benchmarks/cifar10.py --list                           # the plan: every run, done or not
    nohup python benchmarks/cifar10.py --pilots --jobs 2 > runs/cifar10_pilots.log 2>&1 &   # held-out pilots
    nohup python benchmarks/cifar10.py --jobs 2 > runs/cifar10.log 2>&1 &                   # the study (test set)
    python benchmarks/cifar10.py --report-only                    # rewrite the results from the finished runs
    python benchmarks/cifar10.py --quick --data DIR --models-dir DIR ...   # smoke test (tests/)

What the runs need comes first, each made once and kept: the FP students they start from (``cifar10_mini_*_fp``,
continued from their committed checkpoints when those exist) under ``benchmarks/results/cifar10_models``, and when one
distils, the CNN teachers (``TEACHERS``: two ``cifar10_teacher_fp`` nets) and their soft-label file (``vvtq
softlabels``: ``SOFT_CROPS`` crops of every training image at the teachers' own crop scale, each labelled by the
ensemble's mean over the crop and its mirror, seeded, so it is regenerated rather than committed; its name carries a
digest of the teachers' weights, so new teachers make new runs). Every
run trains on the 45,000 training images left after holding out 5,000 (``holdout``, a fixed choice) and sees the
same crops in the same steps of 128; pilots are scored on the held-out images and chose the recipes, the study's
runs on the 10,000 test images. A recipe is the LSQ baseline plus factors (``study_factors``), written ``kd+crops=4``;
here ``kd`` is the teacher's soft-label file. Runs are resumable and shared out to ``--jobs`` workers
(``study_runs``); finished ones live in ``benchmarks/results/cifar10_runs`` with their gzip JSONL metrics.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared study modules beside this script
from study_factors import FACTORS, Context, StudyError, apply_factors, describe, recipe_key  # noqa: E402
from study_runs import (  # noqa: E402
    ROOT,
    Run,
    add_runner_arguments,
    checkpoint_accuracy,
    fmt,
    gzip_copy,
    log,
    mean,
    relative,
    signature,
    stored,
    study_main,
    train_and_ship,
    write_atomic,
    write_report,
)

CONFIGS = ROOT / "src" / "vvtq" / "recipes"
RESULTS = ROOT / "benchmarks" / "results"
MODELS_DIR = RESULTS / "cifar10_models"
DATA = "../shared/data/cifar10"  # relative to the repository root, as the recipes give it
MODELS = ("mini_deit", "mini_swin")
# the FP models the runs start from or distil from: recipe and its --set overrides
FP_RUNS = {"teacher": ("cifar10_teacher_fp", ()), "teacher_b": ("cifar10_teacher_fp", ("epochs=40", "seed=3")),
           "mini_deit": ("cifar10_mini_deit_fp", ()), "mini_swin": ("cifar10_mini_swin_fp", ())}
SHIPPED = {"teacher": "cifar_resnet_teacher", "teacher_b": "cifar_resnet_teacher_b",
           "mini_deit": "cifar10_mini_deit_fp", "mini_swin": "cifar10_mini_swin_fp"}
# the labelling teacher: the mean of these nets' probabilities (ensembles of two or three gained 1.4-1.8 held-out
# points over their best member; cifar10_findings.md)
TEACHERS = ("teacher", "teacher_b")
TEACHER_FLIP = True  # each crop labelled by the mean over it and its mirror (+1.4 held-out points for the teacher)
SOFT_CROPS = 10  # crops stored per image in the soft-label file
LABEL_OPTIONS = ("--crops", str(SOFT_CROPS), "--top-k", "10", "--seed", "0", "--amp", "bf16",
                 *(["--flip"] if TEACHER_FLIP else []))  # how the file is made (bf16: 2.0x faster, within 0.007)
HOLDOUT = 5000
TEST = "val"  # the folder of the 10,000 test images (ImageNet-style naming)
TRAIN_IMAGES = 50_000 - HOLDOUT
BATCH = 128  # crops a step, whatever the crops per image
STUDY_CROPS = 250_000  # per run: 1,954 steps of 128 crops (5.6 passes over the 45,000 images at 1 crop an image)
PILOT_CROPS = 64_000  # per pilot: 500 steps
BUDGETS = (2, 4)  # the budget axis: the baseline and the best on mini DeiT for 2x and 4x STUDY_CROPS (11 and 22 passes)
QUICK_CROPS = 256
WARMUP_FRAC = 0.025  # of a run's steps
BASE_LR = 5e-4  # the LSQ baseline's lr (the published one; the pilots 'lr=...' ask whether another is better)
SEEDS = (0, 1, 2)

# the recipes the study reports (factor strings on the LSQ baseline)
RECIPES = {
    "lsq": ("LSQ baseline (hard labels)", ""),
    "kd": ("+ the teacher's soft labels, 1 crop", "kd"),
    "kd2": ("+ 2 crops an image", "kd+crops=2"),
    "kd4": ("+ 4 crops an image", "kd+crops=4"),
    "paper": ("published VVTQ recipe", "kd+crops=4+md+reg"),
    "vvtq": ("today's shipped vvtq recipe (module-dependent quantizers at twice the lr)", "lr=1e-3+md"),
    "best": ("the best the pilots found (not chosen yet: kd+md holds its place)", "kd+md"),
}
ROWS = {"mini_deit": tuple(RECIPES), "mini_swin": ("lsq", "paper", "best")}
# pilots: W2A2, seed 0, PILOT_CROPS, held-out images; in order of priority
PILOTS = ("", "kd", "lr=1e-3", "lr=2.5e-4", "kd+crops=4", "md", "kd+md", "kd+crops=2", "kd+crops=4+md+reg",
          "lr=1e-3+md", "tcrop", "kd+hard=0.5", "kd+lr=1e-3", "kd+md+lr=1e-3")


def _f_kd(spec: dict, ctx: Context, v: str | None) -> None:
    spec["teacher"] = {**ctx.kd, **{k: x for k, x in (spec.get("teacher") or {}).items() if k == "hard_weight"}}
    spec.update(ctx.kd_crops)  # the file's crops (the recipe's own would not be used): recorded as they are


def _f_tcrop(spec: dict, ctx: Context, v: str | None) -> None:
    spec.update(ctx.kd_crops)


# this study's factors: the shared ones, 'kd' reading the soft-label file, and no second or third teacher
CIFAR_FACTORS = {k: v for k, v in FACTORS.items() if k not in ("ens", "cnn", "wide", "sgelu")} | {
    "kd": ("soft labels of the CNN teachers from the soft-label file (its crops: the teachers' crop scale)", _f_kd),
    "tcrop": ("hard labels on crops of the teacher's scale (the FP students' are [0.35, 1])", _f_tcrop),
}


# --------------------------------------------------------------------------- the plan
def model_path(key: str, models_dir: Path) -> Path:
    return models_dir / f"{SHIPPED[key]}.safetensors"


def build_cfg(model: str, bits: int, recipe: str, seed: int, crops: int, scored_on: str, name: str,
              ctx: Context, args: argparse.Namespace) -> Any:
    """One run's TrainConfig: the model's LSQ recipe on CIFAR-10 (its FP student's data and shape), the factors,
    then the study's common settings. Bits 32: the FP student trained on, unquantized (the ceiling rows)."""
    from vvtq.train import TrainConfig

    fp = TrainConfig.from_recipe(FP_RUNS[model][0])
    spec = TrainConfig.from_recipe(f"{model}_w{2 if bits == 32 else bits}a{2 if bits == 32 else bits}_lsq").to_dict()
    spec.update(data=args.data, img_size=fp.img_size, model_kwargs=dict(fp.model_kwargs), holdout=holdout(args),
                crop_scale=list(fp.crop_scale), lr=BASE_LR)
    lsq_quant = spec["quant"]
    apply_factors(spec, recipe, ctx, CIFAR_FACTORS)
    if bits == 32:
        if spec["quant"] != lsq_quant:
            raise StudyError(f"an FP row (bits 32) takes no quantizer factor; got {recipe!r}")
        spec["quant"] = None
    images, batch = (QUICK_IMAGES, QUICK_BATCH) if args.quick else (TRAIN_IMAGES, BATCH)
    steps = math.ceil(crops / batch)  # the same steps of the same 128 crops, whatever the crops an image
    steps_per_epoch = images // (batch // spec["num_crops"])
    spec.update(out=str(Path(args.work) / name), seed=seed, progress=False, init_from=ctx.teacher,
                val_split=scored_on, ckpt_every_steps=100, log_every=20, batch_size=batch,
                epochs=(steps - 1e-6) / steps_per_epoch,  # the loop takes ceil(epochs * steps_per_epoch) steps
                warmup_epochs=max(1, round(steps * WARMUP_FRAC)) / steps_per_epoch)
    if bits == 2:
        spec["oscillation"] = {"every": 1, **(spec.get("oscillation") or {})}
    if args.quick:
        spec.update(val_subset=100, calib_batches=1)
    return TrainConfig.from_dict(spec)


# --quick: the tiny folder the test writes (120 training images, 24 held out), batches of 32 crops
QUICK_IMAGES, QUICK_HOLDOUT, QUICK_BATCH = 96, 24, 32


def holdout(args: argparse.Namespace) -> int:
    return QUICK_HOLDOUT if args.quick else HOLDOUT


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run asked for, most important first, deduplicated by config (a shared run keeps its first name)."""
    runs: list[Run] = []
    seen: dict[str, Run] = {}
    softlabels, kd_crops = str(softlabel_path(args)), teacher_crops(args)

    def add(model: str, group: str, recipe: str, bits: int, seed: int, crops: int, scored_on: str) -> None:
        ctx = Context(model, str(model_path(model, Path(args.models_dir))), None, None,
                      {"source": "file", "softlabels": softlabels}, kd_crops)
        if group == "pilot":
            prefix = f"pilot{crops // 1000}k_" if crops not in (PILOT_CROPS, QUICK_CROPS) else "pilot_"
            name = f"{prefix}{model}_{recipe_key(recipe)}_w{bits}a{bits}_s{seed}"
        elif bits == 32:
            name = f"{model}_fp_trained_on_{'kd' if recipe else 'hard'}_s{seed}"
        elif group == "budget":
            name = f"{model}_{recipe_key(recipe)}_w{bits}a{bits}_{crops // 1000}k_s{seed}"
        else:
            name = f"{model}_{recipe_key(recipe)}_w{bits}a{bits}_s{seed}"
        cfg = build_cfg(model, bits, recipe, seed, crops, scored_on, name, ctx, args)
        key = signature(cfg.to_dict())
        if key in seen:
            seen[key].aliases.add(recipe)
            return
        seen[key] = Run(name, model, group, recipe, bits, seed, cfg)
        runs.append(seen[key])

    quick = QUICK_CROPS if args.quick else None
    if args.pilots:
        for recipe in args.recipes or PILOTS:
            for model in args.models:
                add(model, "pilot", recipe, 2, 0, quick or args.pilot_crops, "holdout")
        return runs
    crops = quick or STUDY_CROPS
    # the headline first, seed by seed: baseline and best on both students; then the ceilings; the other rows;
    # the W4A4 / W3A3 rows last
    for seed in args.seeds:
        for model in args.models:
            for key in ("lsq", "best"):
                add(model, "main", RECIPES[key][1], 2, seed, crops, TEST)
    for model in args.models:
        for recipe in ("", "kd"):
            add(model, "ceiling", recipe, 32, args.seeds[0], crops, TEST)
    for seed in args.seeds:
        for model in args.models:
            for key in ROWS[model]:
                add(model, "main", RECIPES[key][1], 2, seed, crops, TEST)
    for bits in (4, 3):
        for model in args.models:
            for key in ("lsq", "best"):
                add(model, "bits", RECIPES[key][1], bits, args.seeds[0], crops, TEST)
    # longer runs last: does the method's gain grow with the budget? (the published recipe trains 150 epochs)
    for mult in BUDGETS if "mini_deit" in args.models else ():
        for key in ("lsq", "best"):
            add("mini_deit", "budget", RECIPES[key][1], 2, args.seeds[0], crops * mult, TEST)
    return runs


# --------------------------------------------------------------------------- what the runs start from
def softlabel_path(args: argparse.Namespace) -> Path:
    """The soft-label file. Its name carries a digest of the teachers' weights and the labelling options, so a run
    that distils becomes another run when either changes (``pending`` until the teachers are trained)."""
    teachers = [model_path(k, Path(args.models_dir)) for k in TEACHERS]
    tag = "pending"
    if all(p.is_file() for p in teachers):
        h = hashlib.sha256(shlex.join(LABEL_OPTIONS).encode())
        for p in teachers:
            h.update(p.read_bytes())
        tag = h.hexdigest()[:12]
    return Path(args.work) / f"softlabels_{SOFT_CROPS}crops_{tag}.safetensors"


def teacher_crops(args: argparse.Namespace) -> dict[str, Any]:
    """The crops the shipped teacher was trained on (its recipe's until it is trained), the soft-label file's:
    ``crop_scale`` and ``crop_translate``."""
    from vvtq.checkpoint import read_meta
    from vvtq.train import TrainConfig

    path = model_path(TEACHERS[0], Path(args.models_dir))
    recorded = (read_meta(path).get("train_config") or {}) if path.is_file() else {}
    recipe = TrainConfig.from_recipe(FP_RUNS[TEACHERS[0]][0])
    return {"crop_scale": list(recorded.get("crop_scale", recipe.crop_scale)),
            "crop_translate": float(recorded.get("crop_translate", recipe.crop_translate))}


def _fp_command(key: str, out: Path, args: argparse.Namespace) -> list[str]:
    """The FP run's command, run from the repository root, paths inside it relative (its checkpoint records them)."""
    recipe, overrides = FP_RUNS[key]
    cmd = ["-m", "vvtq", "--threads", str(args.threads), "train", "--config", recipe,
           "--set", f"out={out}", "--set", f"data={args.data}", "--set", "progress=false", "--set",
           "ckpt_every_steps=100", *(a for o in overrides for a in ("--set", o))]
    if args.quick:
        cmd += ["--set", f"holdout={QUICK_HOLDOUT}", "--set", f"batch_size={QUICK_BATCH}", "--set", "epochs=1",
                "--set", "max_steps=2", "--set", "val_subset=50", "--set", "amp=fp32"]
    return [sys.executable, *relative(cmd + (["--resume"] if (out / "last.safetensors").is_file() else []))]


def ensure_inputs(args: argparse.Namespace, runs: list[Run]) -> None:
    """Make what ``runs`` need where it is missing: the FP students they start from, and when one distils, the
    teachers and their soft-label file."""
    distils = any(r.cfg.teacher.source == "file" for r in runs)
    train_fp([k for k in FP_RUNS if k in {r.model for r in runs} or (distils and k in TEACHERS)], args)
    if distils:
        make_softlabels(args)


def train_fp(keys: list[str], args: argparse.Namespace) -> None:
    """Train (one process each, side by side) and ship the FP models ``keys`` that are missing, continuing from a
    committed resume checkpoint where there is one."""
    from vvtq.demo import ship_teacher

    work, models_dir = Path(args.work), Path(args.models_dir)
    jobs = []
    for key in keys:
        if model_path(key, models_dir).is_file():
            continue
        out = work / "fp" / key
        resume = models_dir / f"{SHIPPED[key]}.resume.safetensors"
        if resume.is_file() and not (out / "last.safetensors").is_file():  # the committed run continues
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(resume, out / "last.safetensors")
            gzip_copy(models_dir / f"{SHIPPED[key]}.metrics.jsonl.gz", out / "metrics.jsonl", unzip=True)

        def ship(key: str = key, out: Path = out, resume: Path = resume) -> None:
            ship_teacher(out / "last.safetensors", model_path(key, models_dir))
            gzip_copy(out / "metrics.jsonl", models_dir / f"{SHIPPED[key]}.metrics.jsonl.gz")
            resume.unlink(missing_ok=True)  # the finished model replaces the run in progress
            log(work, f"shipped {model_path(key, models_dir)}")

        jobs.append((key, _fp_command(key, out, args), work / "fp" / f"{key}.log", ship))
    train_and_ship(jobs, work)


def save_progress(args: argparse.Namespace) -> list[str]:
    """Copy each unfinished FP run's last checkpoint (with its optimizer state) and its metrics up to it into the
    models folder as ``*.resume.safetensors`` and ``*.metrics.jsonl.gz``, for a new machine to continue from; the
    names of the runs saved."""
    from vvtq.train import read_meta

    work, models_dir, saved = Path(args.work), Path(args.models_dir), []
    for key in FP_RUNS:
        last = work / "fp" / key / "last.safetensors"
        if model_path(key, models_dir).is_file() or not last.is_file():
            continue
        resume = models_dir / f"{SHIPPED[key]}.resume.safetensors"
        tmp = resume.with_name(resume.name + ".tmp")
        shutil.copyfile(last, tmp)  # the copy, not the live file (the run may replace it), says the step
        step = int(read_meta(tmp)["step"])
        kept = []
        for line in (work / "fp" / key / "metrics.jsonl").read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except json.JSONDecodeError:  # a line the run is still writing
                continue
        metrics = work / "fp" / key / "metrics.saved.jsonl"
        write_atomic(metrics, "".join(kept))
        gzip_copy(metrics, models_dir / f"{SHIPPED[key]}.metrics.jsonl.gz")
        os.replace(tmp, resume)
        saved.append(f"{key} at step {step}")
    return saved


def make_softlabels(args: argparse.Namespace) -> None:
    """The teachers' soft-label file, made once (its name says which teachers and options made it), with a record
    of its command, time and size beside it."""
    work, models_dir, labels = Path(args.work), Path(args.models_dir), softlabel_path(args)
    if labels.is_file():
        return
    teachers = [model_path(k, models_dir) for k in TEACHERS]
    cmd = shlex.join(relative(["vvtq", "--threads", str(args.threads), "softlabels", "--teacher", *map(str, teachers),
                               "--out", str(labels), *LABEL_OPTIONS]))
    t0 = time.time()
    log(work, f"soft labels: {cmd}")
    if subprocess.run([sys.executable, "-m", *shlex.split(cmd)], cwd=ROOT, stdout=subprocess.DEVNULL).returncode:
        raise StudyError(f"soft labels failed: {cmd}")
    write_atomic(labels.with_suffix(".json"), json.dumps({
        "command": cmd, "teachers": {relative(str(p)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                                     for p in teachers},
        "wall_s": round(time.time() - t0, 1), "bytes": labels.stat().st_size, "threads": args.threads}, indent=1))
    log(work, f"soft labels: {labels.stat().st_size / 1e6:.1f} MB in {time.time() - t0:.0f} s")


def fp_accuracy(key: str, split: str, args: argparse.Namespace) -> float | None:
    """An FP model's top-1 (%) on ``split``; ``teacher``: the labelling teacher's (ensemble and mirror included)."""
    keys, flip = (TEACHERS, TEACHER_FLIP) if key == "teacher" else ((key,), False)
    paths = [model_path(k, Path(args.models_dir)) for k in keys]
    if not all(p.is_file() for p in paths):
        return None
    return checkpoint_accuracy(paths, split, holdout(args), Path(args.models_dir) / "accuracy.json", key,
                               limit=100 if args.quick else None, flip=flip)


# --------------------------------------------------------------------------- results
def teacher_name() -> str:
    runs = [" ".join([FP_RUNS[k][0], *FP_RUNS[k][1]]) for k in TEACHERS]
    name = f"cifar_resnet ({runs[0]})" if len(runs) == 1 else f"mean of {len(runs)} cifar_resnet ({'; '.join(runs)})"
    return name + (", each image and its mirror" if TEACHER_FLIP else "")


def summarize(args: argparse.Namespace, runs: list[Run], results: dict[str, dict], command: str) -> dict[str, Any]:
    import timm
    import torch

    def find(model: str, recipe: str, bits: int, seed: int) -> float | None:
        for r in runs:
            if r.group != "budget" and r.is_(model, recipe, bits, seed) and r.name in results:
                return results[r.name]["final_acc"]
        return None

    def budget_axis(model: str) -> dict[str, dict[str, float | None]]:
        """Final top-1 of the baseline and the best (seed 0) at 1x, 2x and 4x the study's crops a run."""
        crops, seed = QUICK_CROPS if args.quick else STUDY_CROPS, args.seeds[0]
        axis = {}
        for key in ("lsq", "best"):
            recipe = RECIPES[key][1]
            row = {"1x": find(model, recipe, 2, seed)}
            for mult in BUDGETS:
                res = results.get(f"{model}_{recipe_key(recipe)}_w2a2_{crops * mult // 1000}k_s{seed}")
                row[f"{mult}x"] = res["final_acc"] if res else None
            axis[key] = row
        return axis

    summary: dict[str, Any] = {}
    for model in args.models:
        row: dict[str, Any] = {"fp": fp_accuracy(model, TEST, args), "fp_holdout": fp_accuracy(model, "holdout",
                                                                                                   args)}
        for key, (_, recipe) in RECIPES.items():
            seeds = [find(model, recipe, 2, s) for s in args.seeds]
            row[f"{key}.w2a2"], row[f"{key}_w2a2_seeds"] = mean(seeds), seeds
            for bits in (4, 3):
                row[f"{key}.w{bits}a{bits}"] = find(model, recipe, bits, args.seeds[0])
        row["fp_trained_on"] = find(model, "", 32, args.seeds[0])
        row["fp_kd_trained_on"] = find(model, "kd", 32, args.seeds[0])
        row["crops_per_run"] = QUICK_CROPS if args.quick else STUDY_CROPS
        if model == "mini_deit":
            row["budget_axis"] = budget_axis(model)
        summary[model] = row
    labels = softlabel_path(args).with_suffix(".json")
    return {"command": command, "quick": args.quick, "summary": summary,
            "teacher": {"name": teacher_name(), "top1": fp_accuracy("teacher", TEST, args),
                        "holdout": fp_accuracy("teacher", "holdout", args),
                        "file": " ".join(relative([str(model_path(k, Path(args.models_dir))) for k in TEACHERS]))},
            "softlabels": json.loads(labels.read_text()) if labels.is_file() else None,
            "recipes": {k: {"label": v[0], "factors": v[1] or "lsq", "description": describe(v[1], CIFAR_FACTORS)}
                        for k, v in RECIPES.items()},
            "budget": {"crops_per_run": QUICK_CROPS if args.quick else STUDY_CROPS, "batch_size_crops": BATCH,
                       "pilot_crops": PILOT_CROPS, "warmup_frac": WARMUP_FRAC, "holdout": HOLDOUT,
                       "base_lr": BASE_LR, "rule": "epochs = crops / (45,000 x crops an image): equal steps and crops"},
            "seeds": list(args.seeds),
            "runs": {r.name: {k: v for k, v in results[r.name].items() if k != "config"} for r in runs
                     if r.name in results},
            "missing": [r.name for r in runs if r.name not in results],
            "wall_s_total": round(sum(results[r.name]["wall_s"] for r in runs if r.name in results), 1),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "units": "final top-1 (%) after the last step; study runs on the 10,000 test images"}


def markdown(doc: dict[str, Any], pilots: list[dict[str, Any]], findings: str | None) -> str:
    t = doc["teacher"]
    lines = ["# CIFAR-10 study: W2A2 recipes against the LSQ baseline, with a strong CNN teacher", "",
             f"Command: `{doc['command']}`" + ("  (**quick smoke run: not a result**)" if doc["quick"] else ""), "",
             f"- Teacher: {t['name']}, test top-1 {fmt(t['top1'])}% (held-out {fmt(t['holdout'])}%), `{t['file']}`.",
             f"- Every run: {doc['budget']['crops_per_run']:,} crops in steps of {BATCH}, from its FP student, on the "
             f"45,000 training images left after holding out {HOLDOUT:,}; baseline lr {BASE_LR:g}.",
             f"- W2A2: mean over seeds {', '.join(map(str, doc['seeds']))}; W4A4 / W3A3 and the ceilings: seed "
             f"{doc['seeds'][0]}. Final top-1 (%) on the 10,000 test images.",
             f"- Worker time of the runs so far: {doc['wall_s_total'] / 3600:.1f} h (one thread each)."]
    if doc.get("softlabels"):
        s = doc["softlabels"]
        lines.append(f"- Soft labels: `{s['command']}`: {s['bytes'] / 1e6:.1f} MB in {s['wall_s'] / 60:.1f} min "
                     f"({s['threads']} thread(s)).")
    lines += ["", "## Recipes", ""]
    lines += [f"- **{k}** ({v['label']}): `{v['factors']}`: {v['description']}" for k, v in doc["recipes"].items()]
    lines += ["", "## Main table", "", "| model | FP | FP trained on (hard / soft) | recipe | W4A4 | W3A3 | W2A2 mean "
              "| W2A2 per seed |", "|---|---|---|---|---|---|---|---|"]
    for model, row in doc["summary"].items():
        for key in ROWS[model]:
            seeds = row.get(f"{key}_w2a2_seeds") or []
            lines.append(f"| {model} | {fmt(row['fp'])} | {fmt(row['fp_trained_on'])} / "
                         f"{fmt(row['fp_kd_trained_on'])} | {key} | {fmt(row[f'{key}.w4a4'])} | "
                         f"{fmt(row[f'{key}.w3a3'])} | {fmt(row[f'{key}.w2a2'])} | "
                         f"{' / '.join(fmt(v) for v in seeds)} |")
    axis = doc["summary"].get("mini_deit", {}).get("budget_axis")
    if axis:
        crops = doc["budget"]["crops_per_run"]
        cols = ["1x", *(f"{m}x" for m in BUDGETS)]
        lines += ["", "## Budget axis (mini DeiT, W2A2, seed 0, test images)", "",
                  "| recipe | " + " | ".join(f"{c} ({int(c[:-1]) * crops:,} crops)" for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        lines += [f"| {key} | " + " | ".join(fmt(row[c]) for c in cols) + " |" for key, row in axis.items()]
    if pilots:
        lines += ["", "## Pilots (W2A2, seed 0, scored on the 5,000 held-out training images)", "",
                  "| model | crops | recipe | held-out top-1 | osc. low-bit | wall | run |",
                  "|---|---|---|---|---|---|---|"]
        for p in sorted(pilots, key=lambda p: (p["model"], p["crops"], -(p["final_acc"] or 0))):
            lines.append(f"| {p['model']} | {p['crops']:,} | `{p['recipe'] or 'lsq'}` | {fmt(p['final_acc'])} | "
                         f"{fmt(p['osc_lowbit'], 4)} | {p['wall_s'] / 60:.1f} min | `{p['name']}` |")
    if doc["missing"]:
        lines += ["", f"Not finished yet ({len(doc['missing'])}): " + ", ".join(f"`{m}`" for m in doc["missing"])]
    lines += ["", "![W2A2 per seed; pilots](cifar10.png)", "", "## Findings", "",
              findings.strip() if findings else "_Not written yet (cifar10_findings.md)._", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], pilots: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    x0, ticks = 0, []
    for model, row in doc["summary"].items():
        keys = ROWS[model]
        for j, key in enumerate(keys):
            seeds = [v for v in row.get(f"{key}_w2a2_seeds") or [] if v is not None]
            if seeds:
                ax1.bar(x0 + j, statistics.fmean(seeds), color=f"C{list(RECIPES).index(key)}",
                        label=key if key not in ax1.get_legend_handles_labels()[1] else None)
                ax1.plot([x0 + j] * len(seeds), seeds, "k.", ms=4)
        for value, style in ((row["fp"], ":"), (row["fp_trained_on"], "--"), (row["fp_kd_trained_on"], "-.")):
            if value is not None:
                ax1.hlines(value, x0 - 0.5, x0 + len(keys) - 0.5, colors="k", linestyles=style, lw=1)
        ticks.append((x0 + (len(keys) - 1) / 2, model))
        x0 += len(keys) + 1
    ax1.set_xticks([t[0] for t in ticks], [t[1] for t in ticks])
    vals = [v for row in doc["summary"].values() for k in RECIPES for v in (row.get(f"{k}_w2a2_seeds") or [])
            if v is not None]
    if vals:
        ax1.set_ylim(min(vals) - 3, max([*vals, *(r["fp_kd_trained_on"] or r["fp"] or 0
                                                 for r in doc["summary"].values())]) + 1)
    ax1.set_ylabel("W2A2 test top-1 (%)")
    ax1.set_title("W2A2 (dots: seeds; lines: FP, FP trained on hard / soft)", fontsize=9)
    if vals:
        ax1.legend(fontsize=7)
    ps = sorted((p for p in pilots if p["final_acc"] is not None), key=lambda p: (p["model"], p["final_acc"]))
    ax2.barh(range(len(ps)), [p["final_acc"] for p in ps],
             color=["tab:blue" if p["model"] == "mini_deit" else "tab:green" for p in ps])
    ax2.set_yticks(range(len(ps)), [f"{p['model'][5:]} {p['recipe'] or 'lsq'} ({(p['crops'] or 0) // 1000}k)"
                                    for p in ps], fontsize=6)
    if ps:
        ax2.set_xlim(min(p["final_acc"] for p in ps) - 1, max(p["final_acc"] for p in ps) + 0.5)
    ax2.set_xlabel("held-out top-1 (%)")
    ax2.set_title("pilots (W2A2, seed 0)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


def write_results(args: argparse.Namespace, store: Path, out: Path, command: str) -> dict[str, Any]:
    args = argparse.Namespace(**{**vars(args), "pilots": False, "recipes": None, "models": list(MODELS)})
    study = plan(args)  # the study's runs, whatever this invocation ran
    results = {r.name: res for r in study if (res := stored(r, store)) is not None}
    return write_report(out, "cifar10", summarize(args, study, results, command), store,
                        RESULTS / "cifar10_findings.md", markdown, plot)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runner_arguments(p, PILOT_CROPS, "a few steps on a tiny folder (smoke test, not a result)", SEEDS,
                         str(ROOT / "runs" / "cifar10"), str(RESULTS / "cifar10_runs"), str(RESULTS))
    p.add_argument("--models", nargs="+", default=None, choices=MODELS,
                   help="the students (default: mini_deit for pilots, both for the study)")
    p.add_argument("--data", default=DATA, help=f"the CIFAR-10 folder (default {DATA})")
    p.add_argument("--models-dir", default=str(MODELS_DIR), help="the FP teachers and students (shipped)")
    p.add_argument("--save-progress", action="store_true", help="copy the unfinished FP runs' last checkpoints and "
                   "metrics into --models-dir (to commit: a new machine continues them), then exit")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    args.models = args.models or (["mini_deit"] if args.pilots else list(MODELS))
    args.seeds = list(dict.fromkeys(args.seeds))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.save_progress:
        print("saved: " + (", ".join(save_progress(args)) or "nothing (no unfinished FP run)"))
        return 0
    argv = sys.argv[1:] if argv is None else list(argv)
    return study_main(args, argv, Path(__file__), plan, ensure_inputs, write_results)


if __name__ == "__main__":
    sys.exit(main())
