"""Accuracy study v2: which W2A2 recipe beats the (fixed) LSQ baseline, on mini DeiT and mini Swin, Fashion-MNIST.

    python benchmarks/accuracy_v2.py --list                      # the plan: every run, done or not
    nohup python benchmarks/accuracy_v2.py --pilots --jobs 2 > runs/pilots.log 2>&1 &   # cheap pilots (holdout)
    nohup python benchmarks/accuracy_v2.py --jobs 2 > runs/accuracy_v2.log 2>&1 &       # the study (test set)
    python benchmarks/accuracy_v2.py --report-only               # rewrite the results from the finished runs
    python benchmarks/accuracy_v2.py --quick --work DIR --store DIR   # smoke test: a few steps of a few runs

A recipe is the LSQ baseline plus *factors* applied one at a time (``study_factors.FACTORS``), written
``kd+crops=2+md``. Every run trains on the 55,000 training images left after holding out 5,000 (``holdout``, a
fixed choice). Pilots (one seed, a short budget) are scored on the held-out images, which chose the recipe; the
study's runs are scored on the 10,000 test images. Every QAT run starts from the shipped FP teacher of its model
(``benchmarks/results/accuracy_v2_teachers``; trained first if missing) and sees the same number of crops.

Resumable across sessions: a finished run is ``STORE/<name>.json`` plus its metrics (gzip JSONL), committed
with the results; an unfinished one continues bit-exactly from ``WORK/<name>/last.safetensors`` when that is
still on disk. ``--jobs N`` starts N worker processes that claim runs one at a time (``WORK/<name>/claim``),
so no worker ever waits for another.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared study modules beside this script
from study_factors import Context, StudyError, apply_factors, describe, parse_factors, recipe_key  # noqa: E402
from study_runs import (  # noqa: E402
    ROOT,
    Run,
    add_runner_arguments,
    checkpoint_accuracy,
    fmt,
    gzip_copy,
    mean,
    signature,
    stored,
    study_main,
    train_and_ship,
    write_report,
)

CONFIGS = ROOT / "src" / "vvtq" / "recipes"
RESULTS = ROOT / "benchmarks" / "results"
TEACHERS = RESULTS / "accuracy_v2_teachers"
MODELS = ("mini_deit", "mini_swin")
# every FP teacher the study may use -> its recipe: each student's own, and a stronger CNN (factor 'cnn')
TEACHER_RECIPES = {"mini_deit": "mini_deit_fp", "mini_swin": "mini_swin_fp", "cnn": "fmnist_cnn_teacher_fp"}
HOLDOUT = 5000
STUDY_CROPS = 120_000  # per QAT run: 2 crop-epochs of Fashion-MNIST's 60,000 (938 steps of 128 crops)
PILOT_CROPS = 30_000  # per pilot: 234 steps
QUICK_CROPS = 256
WARMUP_CROPS = 3_000
SEEDS = (0, 1, 2)

# the recipes the study reports. "best" is the recipe the held-out pilots chose last (eighth sitting: the paired
# full-length pilots of lr=1e-3+md under the dead-step fix gained on both models); "pilots" is what the short
# pilots chose first (third sitting). accuracy_v2_findings.md says why, sitting by sitting
RECIPES = {
    "lsq": ("LSQ baseline", ""),
    "best": ("vvtq (ours): module-dependent quantizers at twice the lr", "lr=1e-3+md"),
    "pilots": ("the short pilots' choice", "kd+crops=2+lr=1e-3+regn=1"),
    "paper": ("published VVTQ recipe", "kd+crops=4+wide+md+reg"),
    "cga": ("LSQ + annealing", "cga"),  # chosen by the paired full-length pilots of the fifth sitting
    "lnch": ("LSQ + per-channel LayerNorm outputs", "lnch"),  # its full-length pilot gained on mini Swin (sixth)
    "lr": ("LSQ at twice the lr", "lr=1e-3"),  # the ablation's strongest row on mini DeiT (sixth sitting)
}
# the pilots: mini DeiT W2A2, seed 0, PILOT_CROPS, scored on the held-out images; one factor at a time first
PILOTS = (  # in order of priority: workers take them first to last
    "", "kd", "md", "qlr=0.1", "kd+hard=0.5", "regn=1", "freeze=0.02", "sgelu", "kd+ens", "kd+crops=2",
    "kd+crops=4", "kd+wide", "qlr=0.01", "wqlr=0", "reg", "regn=10", "lr=1e-3", "lr=2.5e-4",
)


# --------------------------------------------------------------------------- the plan

def build_cfg(model: str, bits: int, recipe: str, seed: int, crops: int, scored_on: str, work: Path, name: str,
              ctx: Context, quick: bool) -> Any:
    """The TrainConfig of one run: the model's LSQ recipe, the factors, then the study's common settings."""
    from vvtq.train import TrainConfig

    # bits 32: the FP model trained on, unquantized, with the W2A2 baseline's settings and steps (ceiling rows)
    base = 2 if bits == 32 else bits
    spec = TrainConfig.from_yaml(CONFIGS / f"{model}_w{base}a{base}_lsq.yaml").to_dict()
    lsq_quant = spec["quant"]
    apply_factors(spec, recipe, ctx)
    if bits == 32:
        if spec["quant"] != lsq_quant:
            raise StudyError(f"an FP row (bits 32) takes no quantizer factor; got {recipe!r}")
        spec["quant"] = None
    batch = 32 if quick else spec["batch_size"]
    steps_per_epoch = (256 if quick else 60_000 - HOLDOUT) // (batch // spec["num_crops"])
    steps = math.ceil(crops / batch)  # whatever the crops per image: the same steps of the same batch
    spec.update(out=str(work / name), seed=seed, progress=False, init_from=ctx.teacher, holdout=HOLDOUT,
                val_split=scored_on, ckpt_every_steps=50, log_every=10,
                epochs=(steps - 1e-6) / steps_per_epoch,  # the loop takes ceil(epochs * steps_per_epoch) steps
                warmup_epochs=steps * WARMUP_CROPS / STUDY_CROPS / steps_per_epoch)
    if bits == 2:  # oscillation tracked on every W2A2 run (cheap); the factor 'freeze' adds its threshold
        spec["oscillation"] = {"every": 1, **(spec.get("oscillation") or {})}
    if quick:
        spec.update(train_subset=256, val_subset=200, batch_size=32, calib_batches=1)
    return TrainConfig.from_dict(spec)


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run asked for, most important first, deduplicated by config (a shared run keeps its first name)."""
    work = Path(args.work)
    runs: list[Run] = []
    seen: dict[str, Run] = {}
    teachers = {m: str(teacher_path(m)) for m in TEACHER_RECIPES}

    def add(model, group, recipe, bits, seed, crops, scored_on):
        ctx = Context(model, teachers[model], next(teachers[o] for o in MODELS if o != model), teachers["cnn"])
        prefix = ""
        if group == "pilot":  # pilots of another length are other runs
            prefix = "pilot_" if crops == PILOT_CROPS or args.quick else f"pilot{crops // 1000}k_"
            prefix += f"{args.tag}_" if args.tag else ""
        name = f"{prefix}{model}_{recipe_key(recipe)}_w{bits}a{bits}_s{seed}" if bits != 32 else \
            f"{model}_fp_trained_on_{recipe_key(recipe) if recipe else 'base'}_s{seed}"  # unquantized: no "lsq"
        cfg = build_cfg(model, bits, recipe, seed, crops, scored_on, work, name, ctx, args.quick)
        key = signature(cfg.to_dict())
        if key in seen:
            seen[key].aliases.add(recipe)
            return seen[key]
        run = Run(name, model, group, recipe, bits, seed, cfg)
        seen[key] = run
        runs.append(run)
        return run

    quick_crops = QUICK_CROPS if args.quick else None
    if args.pilots:
        for recipe in args.recipes or PILOTS:
            for model in args.models:
                add(model, "pilot", recipe, 2, 0, quick_crops or args.pilot_crops, "holdout")
        return runs
    crops, seeds = quick_crops or STUDY_CROPS, args.seeds

    def main_rows(keys: tuple[str, ...], models: tuple[str, ...] = tuple(args.models)) -> None:
        for seed in seeds:
            for model in models:
                for key in keys:
                    add(model, "main", RECIPES[key][1], 2, seed, crops, "test")

    # order of importance: the headline comparison seed by seed, the W4A4 / W3A3 rows, the published recipe, then
    # the ablation (the longest part)
    main_rows(("lsq", "best"))
    for bits in (4, 3):
        for model in args.models:
            for key in ("lsq", "best", "pilots"):
                add(model, "bits", RECIPES[key][1], bits, seeds[0], crops, "test")
    main_rows(("paper",))
    main_rows(("pilots",))
    main_rows(("cga",))
    # the sixth sitting's rows ('lr', 'lnch'): mini Swin's first (mini DeiT's 'lr' runs are the ablation's, and
    # 'lnch' gained on mini Swin in its pilot), then the ablation's rows of the chosen recipes, then mini DeiT's,
    # then the ablation's rows of the published recipe's factors (the report keeps the ablation's own order)
    main_rows(("lr", "lnch"), tuple(m for m in args.models if m == "mini_swin"))
    rows = ablation_recipes()
    chosen = set(ablation_recipes(also=()))
    ablation = "mini_deit" in args.models and not args.no_ablation

    def ablation_rows(recipes: list[str]) -> None:
        for recipe in recipes if ablation else []:
            for seed in seeds:
                add("mini_deit", "ablation", recipe, 2, seed, crops, "test")

    ablation_rows([r for r in rows if r in chosen])
    main_rows(("lr", "lnch"), tuple(m for m in args.models if m != "mini_swin"))
    ablation_rows([r for r in rows if r not in chosen])
    for model in args.models:  # the ceiling: the FP teacher trained on for the same steps, at both lrs
        for key in ("lsq", "lr"):
            add(model, "ceiling", RECIPES[key][1], 32, seeds[0], crops, "test")
    return runs


def ablation_recipes(chains: tuple[str, ...] | None = None, also: tuple[str, ...] | None = None) -> list[str]:
    """Every factor of the ``chains`` (default: the recipes ``best`` and ``pilots``) and of ``also`` (default: the
    published recipe) alone on the baseline, then each chain cumulatively, one factor added a row. A factor that
    needs a teacher ('hard', 'ens', 'cnn') stands on 'kd'."""
    chains = (RECIPES["best"][1], RECIPES["pilots"][1]) if chains is None else chains
    also = (RECIPES["paper"][1],) if also is None else also

    def alone(part: str) -> str:
        return f"kd+{part}" if parse_factors(part)[0][0] in ("hard", "ens", "cnn") else part

    parts = [[p for p in recipe.split("+") if p] for recipe in chains]
    singles = [alone(p) for recipe in (*chains, *also) for p in recipe.split("+") if p]
    cumulative = ["+".join(ps[:i]) for ps in parts for i in range(1, len(ps) + 1)]
    return list(dict.fromkeys(["", *singles, *cumulative]))


# --------------------------------------------------------------------------- teachers
def teacher_path(model: str) -> Path:
    return TEACHERS / f"{model}_fp.safetensors"


def ensure_teachers(args: argparse.Namespace, runs: list[Run] | None = None) -> None:
    """Train (in parallel, one process each) and ship the FP teachers that are missing. ``--quick`` trains none:
    it needs the students' teachers (and the CNN's only if a recipe asks for it)."""
    missing = [m for m in TEACHER_RECIPES if not teacher_path(m).is_file()]
    if args.quick:
        if needed := [m for m in missing if m in MODELS]:
            raise StudyError(f"--quick needs the shipped teachers; missing: {', '.join(needed)}")
        return
    work, jobs = Path(args.work), []
    for m in missing:
        out = work / "teachers" / f"{m}_fp"
        cmd = [sys.executable, "-m", "vvtq", "--threads", str(args.threads), "train", "--config",
               str(CONFIGS / f"{TEACHER_RECIPES[m]}.yaml"), "--set", f"out={out}", "--set", "progress=false",
               "--set", "ckpt_every_steps=100"] + (["--resume"] if (out / "last.safetensors").is_file() else [])
        jobs.append((m, cmd, work / "teachers" / f"{m}.log", lambda out=out, m=m: ship_teacher(out, m)))
    train_and_ship(jobs, work)


def ship_teacher(out: Path, model: str) -> Path:
    """Copy a trained teacher without its optimizer state, with its metrics, into the shipped folder."""
    from vvtq.demo import ship_teacher as copy_weights

    TEACHERS.mkdir(parents=True, exist_ok=True)
    dst = copy_weights(out / "last.safetensors", teacher_path(model))
    gzip_copy(out / "metrics.jsonl", TEACHERS / f"{model}_fp.metrics.jsonl.gz")
    return dst


def teacher_accuracy(model: str, split: str = "test", limit: int | None = None) -> float:
    """Top-1 (%) of a shipped teacher on ``split`` (its first ``limit`` images), cached beside it."""
    return checkpoint_accuracy(teacher_path(model), split, HOLDOUT, TEACHERS / "accuracy.json", model, limit)



def summarize(args: argparse.Namespace, runs: list[Run], results: dict[str, dict], command: str) -> dict[str, Any]:
    import timm
    import torch

    def find(model, recipe, bits, seed):
        for r in runs:
            if r.is_(model, recipe, bits, seed) and r.name in results:
                return results[r.name]["final_acc"]
        return None

    summary: dict[str, Any] = {}
    for model in args.models:
        have, limit = teacher_path(model).is_file(), 200 if args.quick else None
        row: dict[str, Any] = {"fp": teacher_accuracy(model, "test", limit) if have else None,
                               "fp_holdout": teacher_accuracy(model, "holdout", limit) if have else None}
        for key, (_, recipe) in RECIPES.items():
            row[key] = {}
            for bits in (2, 3, 4):
                seeds = args.seeds if bits == 2 else args.seeds[:1]
                vals = [find(model, recipe, bits, s) for s in seeds]
                row[key][f"w{bits}a{bits}"] = mean(vals)
                row[f"{key}.w{bits}a{bits}"] = mean(vals)
                if bits == 2:
                    row[f"{key}_w2a2_seeds"] = vals
        # the ceiling: the FP teacher trained on, unquantized, for the same steps at the baseline's and the lr row's lr
        row["fp_trained_on"] = {key: find(model, RECIPES[key][1], 32, args.seeds[0]) for key in ("lsq", "lr")}
        row["crops_per_run"] = QUICK_CROPS if args.quick else STUDY_CROPS
        summary[model] = row
    limit = 200 if args.quick else None
    teachers = {m: {"file": str(teacher_path(m).relative_to(ROOT)) if teacher_path(m).is_relative_to(ROOT)
                    else teacher_path(m).name, "recipe": TEACHER_RECIPES[m],
                    "test": teacher_accuracy(m, "test", limit), "holdout": teacher_accuracy(m, "holdout", limit)}
                for m in TEACHER_RECIPES if teacher_path(m).is_file()}
    ablation = []
    for recipe in ablation_recipes():
        names = [next((r.name for r in runs if r.is_("mini_deit", recipe, 2, s)), None) for s in args.seeds]
        accs = [results[n]["final_acc"] if n in results else None for n in names]
        oscs = [results[n]["osc_lowbit"] if n in results else None for n in names]
        ablation.append({"recipe": recipe or "lsq", "label": describe(recipe), "final_acc": accs, "mean": mean(accs),
                         "osc_lowbit": oscs})
    return {"command": command, "quick": args.quick, "summary": summary, "teachers": teachers, "ablation": ablation,
            "recipes": {k: {"label": v[0], "factors": v[1] or "lsq", "description": describe(v[1])}
                        for k, v in RECIPES.items()},
            "budget": {"crops_per_run": QUICK_CROPS if args.quick else STUDY_CROPS, "batch_size_crops": 128,
                       "pilot_crops": PILOT_CROPS, "warmup_crops": WARMUP_CROPS, "holdout": HOLDOUT,
                       "rule": "epochs = crops / (55,000 x crops per image): equal steps and crops per step"},
            "seeds": list(args.seeds),
            "runs": {r.name: {k: v for k, v in results[r.name].items() if k != "config"} for r in runs
                     if r.name in results},
            "missing": [r.name for r in runs if r.name not in results],
            "wall_s_total": round(sum(results[r.name]["wall_s"] for r in runs if r.name in results), 1),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "units": "final top-1 (%) after the last step; study runs on the 10,000 test images"}


def markdown(doc: dict[str, Any], pilots: list[dict[str, Any]], findings: str | None) -> str:
    lines = ["# Accuracy study v2: a W2A2 recipe against the fixed LSQ baseline (Fashion-MNIST)", "",
             f"Command: `{doc['command']}`" + ("  (**quick smoke run: not a result**)" if doc["quick"] else ""), "",
             f"- Every QAT run: {doc['budget']['crops_per_run']:,} crops, batch 128 crops, from its model's FP "
             f"teacher; trained on the 55,000 training images left after holding out {doc['budget']['holdout']:,}.",
             f"- W2A2: mean over seeds {', '.join(map(str, doc['seeds']))}; W4A4 / W3A3: seed {doc['seeds'][0]}. "
             "Final top-1 (%) on the 10,000 test images.",
             f"- Wall time of the runs so far: {doc['wall_s_total'] / 3600:.1f} h of worker time (one thread each).",
             "", "## Recipes", ""]
    lines += ["FP teachers (top-1 %, test / held-out): " + "; ".join(
        f"{m} {fmt(t['test'])} / {fmt(t['holdout'])}" for m, t in doc.get("teachers", {}).items()), ""]
    lines += [f"- **{k}** ({v['label']}): `{v['factors']}`: {v['description']}" for k, v in doc["recipes"].items()]
    lines += ["", "## Main table", "", "| model | FP | recipe | W4A4 | W3A3 | W2A2 mean | W2A2 per seed |",
              "|---|---|---|---|---|---|---|"]
    for model, row in doc["summary"].items():
        for key in RECIPES:
            seeds = row.get(f"{key}_w2a2_seeds") or []
            lines.append(f"| {model} | {fmt(row['fp'])} | {key} | {fmt(row[key]['w4a4'])} | "
                         f"{fmt(row[key]['w3a3'])} | {fmt(row[key]['w2a2'])} | "
                         f"{' / '.join(fmt(v) for v in seeds)} |")
    lines += ["", "## Ceiling: the FP teacher trained on, unquantized, for the same steps (seed 0, test set)", "",
              "| model | FP teacher | + the baseline's training (lr 5e-4) | + lr 1e-3 |", "|---|---|---|---|"]
    for model, row in doc["summary"].items():
        ceiling = row.get("fp_trained_on") or {}
        lines.append(f"| {model} | {fmt(row['fp'])} | {fmt(ceiling.get('lsq'))} | {fmt(ceiling.get('lr'))} |")
    lines += ["", "## Ablation (mini DeiT, W2A2, one factor at a time)", "",
              "| recipe | what | top-1 mean | per seed | oscillating low-bit weights (per seed) |",
              "|---|---|---|---|---|"]
    for a in doc["ablation"]:
        lines.append(f"| `{a['recipe']}` | {a['label']} | {fmt(a['mean'])} | "
                     f"{' / '.join(fmt(v) for v in a['final_acc'])} | "
                     f"{' / '.join(fmt(v, 4) for v in a['osc_lowbit'])} |")
    if pilots:
        lines += ["", "## Pilots (W2A2, seed 0, scored on the 5,000 held-out training images)", "",
                  "| model | crops | recipe | held-out top-1 | osc. low-bit | frozen | wall | run |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in sorted(pilots, key=lambda p: (p["model"], p["crops"], -(p["final_acc"] or 0))):
            lines.append(f"| {p['model']} | {p['crops']:,} | `{p['recipe'] or 'lsq'}` | {fmt(p['final_acc'])} | "
                         f"{fmt(p['osc_lowbit'], 4)} | {fmt(p['frozen'], 4)} | {p['wall_s'] / 60:.1f} min | "
                         f"`{p['name']}` |")
    if doc["missing"]:
        lines += ["", f"Not finished yet ({len(doc['missing'])}): " + ", ".join(f"`{m}`" for m in doc["missing"])]
    lines += ["", "![W2A2 per seed and bit-widths](accuracy_v2.png)", "", "## Findings", "",
              findings.strip() if findings else "_Not written yet (accuracy_v2_findings.md)._", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], pilots: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 4.0), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    palette = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan", "tab:red")
    colors = {key: palette[i % len(palette)] for i, key in enumerate(RECIPES)}
    width = len(RECIPES) + 1  # the bars of one model, and a gap
    for i, row in enumerate(doc["summary"].values()):
        for j, key in enumerate(RECIPES):
            seeds = [v for v in row.get(f"{key}_w2a2_seeds") or [] if v is not None]
            x = i * width + j
            if seeds:
                ax1.bar(x, statistics.fmean(seeds), color=colors[key], label=key if i == 0 else None)
                ax1.plot([x] * len(seeds), seeds, "k.", ms=4)
        if row["fp"] is not None:
            ax1.hlines(row["fp"], i * width - 0.5, i * width + len(RECIPES) - 0.5, colors="k", linestyles=":", lw=1)
    centre = (len(RECIPES) - 1) / 2
    ax1.set_xticks([centre, width + centre],
                   list(doc["summary"])[:2] if len(doc["summary"]) > 1 else list(doc["summary"]) + [""])
    vals = [v for row in doc["summary"].values() for k in RECIPES for v in (row.get(f"{k}_w2a2_seeds") or [])
            if v is not None]
    if vals:
        ax1.set_ylim(min(vals) - 2, max(max(vals), *(r["fp"] or 0 for r in doc["summary"].values())) + 1)
    ax1.set_ylabel("W2A2 test top-1 (%)")
    ax1.set_title("W2A2, mean of seeds (dots: each seed; dotted: FP)", fontsize=9)
    ax1.legend(fontsize=7)
    ps = sorted((p for p in pilots if p["final_acc"] is not None), key=lambda p: (p["model"], p["final_acc"]))
    ax2.barh(range(len(ps)), [p["final_acc"] for p in ps], color=["tab:blue" if p["model"] == "mini_deit" else
                                                                  "tab:green" for p in ps])
    def label(p: dict[str, Any]) -> str:
        tag = p["name"].split(f"_{p['model']}")[0].partition("_")[2]  # pilot120k_r2_mini_deit_... -> r2
        return f"{p['model'][5:]} {p['recipe'] or 'lsq'} ({(p['crops'] or 0) // 1000}k{', ' + tag if tag else ''})"

    ax2.set_yticks(range(len(ps)), [label(p) for p in ps], fontsize=6)
    if ps:
        ax2.set_xlim(min(p["final_acc"] for p in ps) - 1, max(p["final_acc"] for p in ps) + 0.5)
    ax2.set_xlabel("held-out top-1 (%)")
    ax2.set_title("pilots (W2A2, seed 0; crops per run in brackets)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


def write_results(args: argparse.Namespace, store: Path, out: Path, command: str) -> dict:
    study_args = argparse.Namespace(**{**vars(args), "pilots": False, "recipes": None})
    study = plan(study_args)
    results = {r.name: res for r in study if (res := stored(r, store)) is not None}
    return write_report(out, "accuracy_v2", summarize(args, study, results, command), store,
                        out / "accuracy_v2_findings.md", markdown, plot)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runner_arguments(p, PILOT_CROPS, "a few steps on 256 images (smoke test, not a result)", SEEDS,
                         str(ROOT / "runs" / "accuracy_v2"), str(RESULTS / "accuracy_v2_runs"), str(RESULTS))
    p.add_argument("--models", nargs="+", default=["mini_deit"], choices=MODELS,
                   help="with --pilots: the models (default mini_deit); the study always runs both")
    p.add_argument("--tag", default=None, help="with --pilots: a name part for pilots trained again (a stored "
                   "pilot of the same config made by older code keeps its own name)")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--teachers", default=None, help=f"FP teachers' folder (default {TEACHERS.relative_to(ROOT)})")
    args = p.parse_args(argv)
    if not args.pilots:
        args.models = list(MODELS) if args.models == ["mini_deit"] and not args.quick else args.models
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    args.seeds = list(dict.fromkeys(args.seeds))
    return args


def main(argv: list[str] | None = None) -> int:
    global TEACHERS
    args = parse_args(argv)
    TEACHERS = Path(args.teachers) if args.teachers else TEACHERS
    argv = sys.argv[1:] if argv is None else list(argv)
    return study_main(args, argv, Path(__file__), plan, ensure_teachers, write_results)


if __name__ == "__main__":
    sys.exit(main())
