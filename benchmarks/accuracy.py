"""Accuracy study: FP vs the LSQ baseline vs VVTQ at W4A4 / W3A3 / W2A2 on Fashion-MNIST (mini DeiT, mini Swin),
an ablation of the VVTQ components at W2A2 (mini DeiT), all at equal budgets of image-crops.

    python benchmarks/accuracy.py --estimate-only --jobs 2           # list the runs and the time estimate
    nohup python benchmarks/accuracy.py --jobs 2 > runs/accuracy.log 2>&1 &   # the full study, in the background:
                                                                     # 2 one-thread workers, teachers first
    python benchmarks/accuracy.py --jobs 2                           # rerun: resumes where it stopped
    python benchmarks/accuracy.py --teacher-deit CKPT --teacher-swin CKPT     # start from given FP teachers
    python benchmarks/accuracy.py --report-only                      # rewrite the results from finished runs
    python benchmarks/accuracy.py --quick                            # smoke test: a few steps of every run

Every run is a folder ``WORK/<run-name>`` (``result.json`` marks it finished; an unfinished one with a
``last.safetensors`` is continued bit-exactly). Writes ``OUT/accuracy.json``, ``OUT/accuracy.md`` and
``OUT/accuracy.png``; progress goes to stdout and ``WORK/progress.log``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MODELS = ("mini_deit", "mini_swin")
BITS = (4, 3, 2)
RECIPES = {"lsq": "LSQ baseline", "vvtq": "VVTQ"}
DEFAULT_BUDGET = 0.5  # crop-epochs per QAT run: 30k crops; the 26 runs took 2h20m with --jobs 2 on 2 cores
QUICK_BUDGET = 0.5  # of the 256-image subset: 4 steps of 32 crops
WARMUP_CROP_EPOCHS = 0.05  # the lsq recipes' warmup (1 crop per image); KD runs get the same number of steps
# nominal speeds on one free core of this machine (crops/s for training, images/s for evaluation); measured at
# load ~6 and scaled by 3, so only a guide: the log prints an ETA from the speeds actually seen.
RATES = {"mini_deit": {"fp": 350.0, "qat": 130.0, "eval": 1200.0},
         "mini_swin": {"fp": 250.0, "qat": 100.0, "eval": 900.0}}
THREAD_SPEEDUP = 1.6  # two threads vs one
# ablation at W2A2 on mini_deit: (key, components, label); each component alone, then cumulatively
ABLATION = [
    ("lsq", (), "LSQ baseline"),
    ("kd", ("kd",), "+ multi-crop KD"),
    ("md", ("md",), "+ module-dependent quantization"),
    ("reg", ("reg",), "+ bin regularizer"),
    ("kd_md", ("kd", "md"), "+ KD + module-dependent"),
    ("kd_md_reg", ("kd", "md", "reg"), "+ KD + module-dependent + regularizer (= VVTQ)"),
]
ABLATION_ALONE = ("lsq", "kd", "md", "reg")
ABLATION_CUMULATIVE = ("lsq", "kd", "kd_md", "kd_md_reg")
COMPONENT_NAMES = {"kd": "multi-crop KD", "md": "module-dependent", "reg": "bin regularizer"}


class StudyError(RuntimeError):
    """The work folder does not fit the study asked for, or an input is missing."""


@dataclass
class Run:
    """One training run of the study."""

    name: str
    model: str
    kind: str  # fp, lsq, vvtq, or an ablation key
    bits: int | None
    seed: int
    cfg: Any  # TrainConfig
    groups: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


# --------------------------------------------------------------------------- small helpers
def _log(work: Path, msg: str) -> None:
    line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
    print(line, flush=True)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "progress.log", "a") as f:
        f.write(line + "\n")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so configs compare equal however they were made."""
    return json.loads(json.dumps(obj))


def _hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else None


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _final_osc(metrics: Path) -> float | None:
    """The last ``osc/overall`` logged in a metrics.jsonl, or None."""
    value = None
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("type") == "step" and "osc/overall" in rec:
                    value = float(rec["osc/overall"])
    return value


# --------------------------------------------------------------------------- the plan
def _finish_cfg(cfg: Any, args: argparse.Namespace, out: Path, seed: int, teacher: str | None,
                osc: bool, budget: float | None) -> Any:
    """Apply the study's common settings to a recipe: run folder, seed, equal crop budget, quick subsets."""
    from vvtq.train import TrainConfig

    data = cfg.to_dict()
    data.update(out=str(out), seed=seed, progress=False)
    if args.quick:
        data.update(train_subset=256, val_subset=200, batch_size=32, calib_batches=1)
    if cfg.quant is not None:  # QAT: from the FP teacher, equal crops: epochs x num_crops = budget
        data.update(init_from=teacher, epochs=budget / cfg.num_crops,
                    warmup_epochs=WARMUP_CROP_EPOCHS / cfg.num_crops, ckpt_every_steps=args.ckpt_every)
        if (data["teacher"] or {}).get("source", "none") == "live":
            data["teacher"] = {**data["teacher"], "checkpoint": teacher}
        if osc:
            data["oscillation"] = {"every": 1}
    elif args.quick:  # a tiny FP teacher
        data.update(epochs=1)
    return TrainConfig.from_dict(data)


def plan(args: argparse.Namespace, teachers: dict[str, str]) -> tuple[list[Run], dict[str, Run]]:
    """Every run of the study (deduplicated by config) and the FP teacher runs to train here."""
    from vvtq.train import TrainConfig

    work, budget = Path(args.work), args.budget
    runs: dict[str, Run] = {}
    by_key: dict[str, str] = {}
    fp_runs: dict[str, Run] = {}

    def add(run: Run, group: str) -> Run:
        key = json.dumps({k: v for k, v in _plain(run.cfg.to_dict()).items() if k != "out"}, sort_keys=True)
        if key in by_key:  # the same training already planned under another name: reuse it
            run = runs[by_key[key]]
        else:
            by_key[key], runs[run.name] = run.name, run
        if group not in run.groups:
            run.groups.append(group)
        return run

    for model in args.models:
        if model not in teachers:
            fp_cfg = TrainConfig.from_yaml(CONFIGS / f"{model}_fp.yaml")
            fp_runs[model] = add(Run(f"{model}_fp", model, "fp", None, fp_cfg.seed,
                                     _finish_cfg(fp_cfg, args, work / f"{model}_fp", fp_cfg.seed, None, False, None)),
                                 "teacher")
        teacher = teachers.get(model) or str(work / f"{model}_fp" / "last.safetensors")
        for recipe in RECIPES:
            for bits in BITS:
                base = TrainConfig.from_yaml(CONFIGS / f"{model}_w{bits}a{bits}_{recipe}.yaml")
                for seed in (args.seeds if bits == 2 else args.seeds[:1]):
                    name = f"{model}_{recipe}_w{bits}a{bits}_s{seed}"
                    cfg = _finish_cfg(base, args, work / name, seed, teacher, bits == 2, budget)
                    add(Run(name, model, recipe, bits, seed, cfg), "main")
    if args.ablation and "mini_deit" in args.models:
        model, teacher = "mini_deit", teachers.get("mini_deit") or str(work / "mini_deit_fp" / "last.safetensors")
        base = TrainConfig.from_yaml(CONFIGS / f"{model}_w2a2_lsq.yaml")
        full = TrainConfig.from_yaml(CONFIGS / f"{model}_w2a2_vvtq.yaml")
        for key, components, _ in ABLATION:
            spec = base.to_dict()
            if "kd" in components:  # soft labels of the teacher for each crop, and the VVTQ recipe's crops
                spec.update(teacher={"source": "live", "checkpoint": teacher}, num_crops=full.num_crops,
                            crop_scale=full.crop_scale)
            if "md" in components:
                spec["quant"] = {**spec["quant"], "preset": "vvtq"}
            if "reg" in components:
                spec["regularizer"] = {"lambda_max": 0.01, "start_frac": 0.25}
            cfg0 = TrainConfig.from_dict(spec)
            for seed in args.seeds:
                name = f"{model}_abl_{key}_w2a2_s{seed}"
                cfg = _finish_cfg(cfg0, args, work / name, seed, teacher, True, budget)
                add(Run(name, model, key, 2, seed, cfg), f"ablation:{key}")
    return list(runs.values()), fp_runs


# --------------------------------------------------------------------------- time estimate
def _steps_and_crops(cfg: Any) -> tuple[int, int]:
    n = cfg.train_subset or 60_000
    spe = n // (cfg.batch_size // cfg.num_crops)
    steps = max(1, math.ceil(cfg.epochs * spe))
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    return steps, steps * cfg.batch_size


def estimate_s(run: Run, threads: int, fresh: bool = False) -> float:
    """Nominal seconds left for a run (0 if finished); ``fresh``: the whole run, whatever is on disk."""
    if not fresh and (run.out / "result.json").is_file():
        return 0.0
    steps, crops = _steps_and_crops(run.cfg)
    done = 0
    last = run.out / "last.safetensors"
    if not fresh and last.is_file():
        from vvtq.train import read_meta

        try:
            done = int(read_meta(last).get("step", 0))
        except Exception:  # an unreadable checkpoint: count the run as not started
            done = 0
    rate = RATES.get(run.model, RATES["mini_swin"])
    speed = THREAD_SPEEDUP if threads >= 2 else 1.0
    train_s = crops * max(steps - done, 0) / steps / (rate["fp" if run.cfg.quant is None else "qat"] * speed)
    n_val = run.cfg.val_subset or 10_000
    evals = math.ceil(run.cfg.epochs) if run.cfg.quant is None else 1
    return train_s + evals * n_val / (rate["eval"] * speed)


def assign_shards(runs: list[Run], n: int, threads: int) -> list[list[Run]]:
    """Split the runs over ``n`` workers: FP teachers first, then longest first onto the least-loaded worker.

    Depends only on the plan (not on what is on disk), so every worker computes the same split.
    """
    shards: list[list[Run]] = [[] for _ in range(n)]
    load = [0.0] * n
    order = sorted(runs, key=lambda r: (r.cfg.quant is not None, -estimate_s(r, threads, fresh=True), r.name))
    for run in order:
        k = min(range(n), key=lambda i: (load[i], i))
        shards[k].append(run)
        load[k] += estimate_s(run, threads, fresh=True)
    return shards


def wait_for_teacher(fp_run: Run, work: Path, poll_s: float = 20.0) -> bool:
    """Block until another worker has finished (True) or failed (False) the FP teacher ``fp_run``."""
    while True:
        if (fp_run.out / "result.json").is_file():
            return True
        if (fp_run.out / "failed.txt").is_file():
            return False
        time.sleep(poll_s)


def spawn_workers(args: argparse.Namespace, argv: list[str], work: Path) -> list[int]:
    """Run the study as ``args.jobs`` worker processes (``--shard K/N``); returns their exit codes."""
    import subprocess

    # drop --jobs N / --jobs=N: the workers run one share each
    cleaned, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--jobs":
            skip = True
            continue
        if a.startswith("--jobs="):
            continue
        cleaned.append(a)
    procs = []
    for k in range(args.jobs):
        cmd = [sys.executable, str(Path(__file__).resolve()), *cleaned, "--shard", f"{k}/{args.jobs}"]
        with open(work / f"worker{k}.log", "a") as log:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        _log(work, f"worker {k}: pid {procs[-1].pid}, log {work / f'worker{k}.log'}")
    return [p.wait() for p in procs]


# --------------------------------------------------------------------------- running
def execute(run: Run, work: Path) -> dict[str, Any] | None:
    """Train one run (or continue it, or read its result); returns its result, None if it failed."""
    import yaml

    from vvtq.train import train

    want = _plain(run.cfg.to_dict())
    res_path = run.out / "result.json"
    if res_path.is_file():
        res = json.loads(res_path.read_text())
        if res["config"] != want:
            raise StudyError(f"{run.out} holds a finished run with another config; use another --work "
                             f"(or delete that folder)")
        return res
    resume = (run.out / "last.safetensors").is_file()
    if resume:
        old = _plain(yaml.safe_load((run.out / "config.yaml").read_text()))
        if old != want:
            raise StudyError(f"{run.out} holds an unfinished run with another config; use another --work "
                             f"(or delete that folder)")
    (run.out / "failed.txt").unlink(missing_ok=True)
    t0 = time.time()
    try:
        out = train(run.cfg, resume=resume)
    except Exception as exc:  # a failed run is reported and the study goes on
        _log(work, f"FAILED {run.name}: {type(exc).__name__}: {exc}")
        _write_atomic(run.out / "failed.txt", f"{type(exc).__name__}: {exc}\n")
        return None
    res = {"name": run.name, "model": run.model, "kind": run.kind, "bits": run.bits, "seed": run.seed,
           "groups": run.groups, "num_crops": run.cfg.num_crops, "epochs": run.cfg.epochs, "steps": out["step"],
           "crops": out["step"] * run.cfg.batch_size, "final_acc": out["final_acc"], "best_acc": out["best_acc"],
           "wall_s": round(time.time() - t0, 1), "resumed": resume,
           "osc_overall": _final_osc(run.out / "metrics.jsonl"), "config": want}
    _write_atomic(res_path, json.dumps(res, indent=1))
    return res


def fp_accuracy(model: str, path: str, cfg: Any, work: Path) -> float:
    """Top-1 (%) of a given FP checkpoint on the study's validation set (cached in WORK)."""
    import torch

    from vvtq.data import SubsetImageDataset, build_dataset
    from vvtq.train import evaluate, load_model
    from vvtq.train.loop import eval_loader

    p = Path(path)
    if not p.is_file():
        raise StudyError(f"teacher checkpoint not found: {path}")
    key = {"path": str(p.resolve()), "size": p.stat().st_size, "mtime": p.stat().st_mtime,
           "val_subset": cfg.val_subset, "val_split": cfg.val_split}
    cache = work / f"{model}_fp_eval.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data["key"] == key:
            return data["acc"]
    net, meta = load_model(p)
    base = build_dataset(cfg.data, cfg.val_split, cfg.data_root)
    if cfg.val_subset:
        base = SubsetImageDataset(base, range(min(cfg.val_subset, len(base))))
    acc = evaluate(net, eval_loader(base, meta["img_size"]), torch.device("cpu"))["acc"]
    _write_atomic(cache, json.dumps({"key": key, "acc": acc}))
    return acc


# --------------------------------------------------------------------------- results
def _acc(results: dict[str, dict], name: str) -> float | None:
    r = results.get(name)
    return None if r is None else r["final_acc"]


def summarize(args: argparse.Namespace, runs: list[Run], results: dict[str, dict], fp: dict[str, float | None],
              teachers: dict[str, str], command: str, estimate: float) -> dict[str, Any]:
    """The accuracy.json document."""
    import timm
    import torch

    def seeds_of(model: str, recipe: str, bits: int) -> dict[str, float | None]:
        return {str(s): _acc(results, _resolve(runs, f"{model}_{recipe}_w{bits}a{bits}_s{s}"))
                for s in (args.seeds if bits == 2 else args.seeds[:1])}

    summary: dict[str, Any] = {}
    per_seed: dict[str, Any] = {}
    for model in args.models:
        summary[model] = {"fp": fp.get(model)}
        per_seed[model] = {}
        for recipe in RECIPES:
            summary[model][recipe], per_seed[model][recipe] = {}, {}
            for bits in BITS:
                vals = seeds_of(model, recipe, bits)
                summary[model][recipe][f"w{bits}a{bits}"] = _mean(list(vals.values()))
                per_seed[model][recipe][f"w{bits}a{bits}"] = vals
    ablation = []
    if args.ablation and "mini_deit" in args.models:
        for key, components, label in ABLATION:
            names = [_resolve(runs, f"mini_deit_abl_{key}_w2a2_s{s}") for s in args.seeds]
            accs = [_acc(results, n) for n in names]
            oscs = [results[n]["osc_overall"] if n in results else None for n in names]
            ablation.append({"key": key, "label": label, "components": list(components), "runs": names,
                             "seeds": args.seeds, "final_acc": accs, "mean": _mean(accs), "osc_overall": oscs})
    sample = next((r for r in runs if r.cfg.quant is not None), None)
    steps, crops = _steps_and_crops(sample.cfg) if sample else (0, 0)
    return {
        "command": command,
        "quick": args.quick,
        "budget": {"crop_epochs": args.budget, "crops_per_run": crops,
                   "crops_nominal": round(args.budget * (sample.cfg.train_subset or 60_000)) if sample else 0,
                   "steps_per_run": steps,
                   "batch_size_crops": sample.cfg.batch_size if sample else None,
                   "rule": "epochs = budget / num_crops (1 crop: LSQ recipes; 4 crops: KD recipes)",
                   "warmup_crop_epochs": WARMUP_CROP_EPOCHS},
        "seeds": {"w2a2": args.seeds, "w4a4_w3a3": args.seeds[:1], "teachers": "fixed (recipe seed 0)"},
        "teachers": {m: {"checkpoint": teachers.get(m) or str(Path(args.work) / f"{m}_fp" / "last.safetensors"),
                         "trained_here": m not in teachers, "final_acc": fp.get(m)} for m in args.models},
        "summary": summary,
        "per_seed": per_seed,
        "ablation": ablation,
        "runs": {r.name: results.get(r.name, {"name": r.name, "missing": True, "config": _plain(r.cfg.to_dict())})
                 for r in runs},
        "estimate_s": round(estimate),
        "wall_s_total": round(sum(r.get("wall_s", 0.0) for r in results.values()), 1),
        "threads": args.threads,
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "units": "final test top-1 (%) after the last step; summary values are means over seeds",
    }


def _resolve(runs: list[Run], name: str) -> str:
    """The planned run a name refers to (an ablation row may share its run with the main table)."""
    for r in runs:
        if r.name == name:
            return name
    if "_abl_" in name:  # deduplicated: the run whose groups hold this ablation row and seed
        key, seed = name.split("_abl_")[1].rsplit("_w2a2_s", 1)
        for r in runs:
            if f"ablation:{key}" in r.groups and r.seed == int(seed):
                return r.name
    return name


def markdown(doc: dict[str, Any], runs: list[Run], results: dict[str, dict], findings: str | None = None) -> str:
    """The accuracy.md report; ``findings``: the text of its last section (written by hand)."""
    b = doc["budget"]
    seeds = doc["seeds"]["w2a2"]
    lines = ["# Accuracy study: LSQ baseline vs VVTQ (Fashion-MNIST, mini DeiT / mini Swin)", "",
             f"Command: `{doc['command']}`" + ("  (**quick smoke run: not a result**)" if doc["quick"] else ""), "",
             f"- **Budget**: {b['crop_epochs']} crop-epochs per QAT run = {b['crops_nominal']:,} image-crops "
             f"(~{b['steps_per_run']} steps of {b['batch_size_crops']} crops; the exact steps of each run are in "
             f"the last table); {b['rule']}; warmup "
             f"{b['warmup_crop_epochs']} crop-epochs. Every QAT run starts from the same FP teacher checkpoint.",
             f"- **Seeds**: W2A2 rows: seeds {', '.join(map(str, seeds))} (mean, then each seed); W4A4/W3A3: seed "
             f"{seeds[0]}; FP teachers: the recipe's fixed seed.",
             "- Accuracies: final test top-1 (%) after the last step (Fashion-MNIST test set"
             + (", first 200 images" if doc["quick"] else ", 10,000 images") + ").",
             "- Teachers: " + "; ".join(f"{m}: `{t['checkpoint']}` (final top-1 {_fmt(t['final_acc'])}, "
                                        f"{'trained by this study' if t['trained_here'] else 'given'})"
                                        for m, t in doc["teachers"].items()) + ".",
             f"- Wall time of the runs: {_hms(doc['wall_s_total'])} ({doc['threads']} thread(s), {doc['cpus']} CPUs; "
             f"estimate printed at the start: {_hms(doc['estimate_s'])}).", "",
             "## Main table", "",
             "| model | recipe | FP | W4A4 | W3A3 | W2A2 mean (" + " / ".join(f"s{s}" for s in seeds) + ") |",
             "|---|---|---|---|---|---|"]
    for model, row in doc["summary"].items():
        lines.append(f"| {model} | FP teacher | {_fmt(row['fp'])} | | | |")
        for recipe, label in RECIPES.items():
            ps = doc["per_seed"][model][recipe]["w2a2"]
            w2 = f"{_fmt(row[recipe]['w2a2'])} ({' / '.join(_fmt(v) for v in ps.values())})"
            lines.append(f"| {model} | {label} | | {_fmt(row[recipe]['w4a4'])} | {_fmt(row[recipe]['w3a3'])} | {w2} |")
    if doc["ablation"]:
        rows = {a["key"]: a for a in doc["ablation"]}
        lines += ["", "## Ablation (mini_deit, W2A2)", "",
                  "Each component added alone to the LSQ baseline, then cumulatively. Same budget and seeds.", "",
                  "| | setting | components | top-1 mean | per seed | osc. fraction (per seed) |",
                  "|---|---|---|---|---|---|"]
        for part, keys in (("alone", ABLATION_ALONE), ("cumulative", ABLATION_CUMULATIVE)):
            for key in keys:
                a = rows[key]
                comps = ", ".join(COMPONENT_NAMES[c] for c in a["components"]) or "none"
                lines.append(f"| {part} | {a['label']} | {comps} | {_fmt(a['mean'])} | "
                             f"{' / '.join(_fmt(v) for v in a['final_acc'])} | "
                             f"{' / '.join(_fmt(v, 4) for v in a['osc_overall'])} |")
    lines += ["", "## All runs", "",
              "Oscillation: final fraction of oscillating weights (`osc/overall`, tracked every step) for W2A2 runs.",
              "", "| run | model | recipe | bits | seed | crops/image | steps | final | best | osc. fraction | wall |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        r = results.get(run.name)
        bits = "FP" if run.bits is None else f"W{run.bits}A{run.bits}"
        if r is None:
            lines.append(f"| {run.name} | {run.model} | {run.kind} | {bits} | {run.seed} | {run.cfg.num_crops} | "
                         f"| not finished | | | |")
            continue
        wall = _hms(r["wall_s"]) + (" (last attempt)" if r.get("resumed") else "")
        lines.append(f"| {run.name} | {run.model} | {run.kind} | {bits} | {run.seed} | {run.cfg.num_crops} | "
                     f"{r['steps']} | {_fmt(r['final_acc'])} | {_fmt(r['best_acc'])} | "
                     f"{_fmt(r.get('osc_overall'), 4)} | {wall} |")
    lines += ["", "![accuracy against bit-width](accuracy.png)", "", "## Findings", ""]
    lines += [findings.strip() if findings else "_Not written yet: put them in `accuracy_findings.md` beside this "
              "file; every rewrite of this report includes that file here._", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Accuracy against bit-width: one line per (recipe, model); FP teachers dashed; seeds as dots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    colors = {"mini_deit": "tab:blue", "mini_swin": "tab:orange"}
    styles = {"lsq": ("--", "o"), "vvtq": ("-", "s")}
    for model, row in doc["summary"].items():
        color = colors.get(model, "tab:gray")
        if row["fp"] is not None:
            ax.axhline(row["fp"], color=color, lw=0.8, ls=":", label=f"{model} FP")
        for recipe, label in RECIPES.items():
            ls, marker = styles[recipe]
            pts = [(b, row[recipe][f"w{b}a{b}"]) for b in sorted(BITS) if row[recipe][f"w{b}a{b}"] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), ls=ls, marker=marker, color=color, label=f"{model} {label}")
            for v in doc["per_seed"][model][recipe]["w2a2"].values():
                if v is not None:
                    ax.plot([2], [v], marker=marker, ms=3, color=color, alpha=0.5, ls="none")
    ax.set_xticks(list(sorted(BITS)), [f"W{b}A{b}" for b in sorted(BITS)])
    ax.set_xlabel("bit-width")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Fashion-MNIST, equal crop budget" + (" (quick smoke run)" if doc["quick"] else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps of every run on 256 images (smoke test)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"crop-epochs per QAT run (default {DEFAULT_BUDGET}; quick: {QUICK_BUDGET} of the subset)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the W2A2 rows (the first: W4/W3)")
    p.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip the W2A2 ablation")
    p.add_argument("--teacher-deit", default=None, help="FP mini_deit checkpoint (default: trained by the study)")
    p.add_argument("--teacher-swin", default=None, help="FP mini_swin checkpoint (default: trained by the study)")
    p.add_argument("--work", default=None, help="run folders (default runs/accuracy; quick: runs/accuracy_quick)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; quick: WORK/results)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps inside a run (resumption)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process with --threads threads (default 1)")
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # K/N: a --jobs worker's share of the runs
    p.add_argument("--estimate-only", action="store_true", help="print the plan and the time estimate, then exit")
    p.add_argument("--report-only", action="store_true", help="write the results from finished runs, train nothing")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
    if args.budget <= 0:
        p.error("--budget must be positive")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.shard is not None:
        k, _, n = args.shard.partition("/")
        if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
            p.error(f"--shard must be K/N with 0 <= K < N, got {args.shard}")
        args.shard = (int(k), int(n))
    args.work = args.work or str(ROOT / ("runs/accuracy_quick" if args.quick else "runs/accuracy"))
    args.out = args.out or (str(Path(args.work) / "results") if args.quick else str(ROOT / "benchmarks/results"))
    args.seeds = list(dict.fromkeys(args.seeds))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/accuracy.py", *argv])
    work, out_dir = Path(args.work), Path(args.out)
    teachers = {m: p for m, p in (("mini_deit", args.teacher_deit), ("mini_swin", args.teacher_swin))
                if p and m in args.models}
    for model, path in teachers.items():
        if not Path(path).is_file():
            raise StudyError(f"--teacher-{model.split('_')[1]}: checkpoint not found: {path}")
    runs, fp_runs = plan(args, teachers)
    estimate = sum(estimate_s(r, args.threads) for r in runs)
    n_qat = sum(r.cfg.quant is not None for r in runs)
    _log(work, f"accuracy study: {len(runs)} runs ({len(fp_runs)} FP teachers, {n_qat} QAT) in {work}; budget "
               f"{args.budget} crop-epochs per QAT run; {args.threads} thread(s)")
    _log(work, f"estimate: {_hms(estimate)} left (nominal speeds on a free core; the ETA below follows the "
               f"speeds measured)")
    if args.estimate_only:
        for r in runs:
            print(f"  {r.name:36s} {', '.join(r.groups):40s} {_hms(estimate_s(r, args.threads))}")
        if args.jobs > 1:
            loads = [sum(estimate_s(r, args.threads) for r in sh) for sh in assign_shards(runs, args.jobs,
                                                                                       args.threads)]
            print(f"with --jobs {args.jobs}: about {_hms(max(loads))} of wall time (the busiest worker)")
        return 0
    if args.jobs > 1 and args.shard is None and not args.report_only:
        codes = spawn_workers(args, argv, work)
        _log(work, f"workers finished with exit codes {codes}; writing the results")
        args.report_only = True
    mine = None
    if args.shard is not None:
        k, n = args.shard
        mine = {r.name for r in assign_shards(runs, n, args.threads)[k]}
        estimate = sum(estimate_s(r, args.threads) for r in runs if r.name in mine)
        _log(work, f"worker {k}/{n}: {len(mine)} runs, estimate {_hms(estimate)}")

    results: dict[str, dict] = {}
    spent_est, spent_real, remaining = 0.0, 0.0, estimate
    # FP teachers first: the QAT runs start from them (a worker waits for a teacher another worker trains)
    for i, run in enumerate(sorted(runs, key=lambda r: r.cfg.quant is not None), 1):
        if mine is not None and run.name not in mine:
            continue
        est = estimate_s(run, args.threads)
        if args.report_only:
            res_path = run.out / "result.json"
            if res_path.is_file():
                results[run.name] = json.loads(res_path.read_text())
            continue
        if run.cfg.quant is not None and run.model in fp_runs and run.model not in teachers \
                and fp_runs[run.model].name not in results:
            fp_run = fp_runs[run.model]
            if mine is None or fp_run.name in mine or not wait_for_teacher(fp_run, work):
                _log(work, f"skip {run.name}: its FP teacher did not finish")
                continue
        if est:
            _log(work, f"[{i}/{len(runs)}] {run.name} ({', '.join(run.groups)}): starting"
                       + (" (continuing)" if (run.out / "last.safetensors").is_file() else ""))
        t0 = time.time()
        res = execute(run, work)
        if res is None:
            remaining -= est
            continue
        results[run.name] = res
        if est:
            spent_est, spent_real, remaining = spent_est + est, spent_real + time.time() - t0, remaining - est
            eta = remaining * spent_real / max(spent_est, 1e-9)
            _log(work, f"[{i}/{len(runs)}] {run.name}: final {res['final_acc']:.2f}% best {res['best_acc']:.2f}% "
                       f"osc {_fmt(res['osc_overall'], 4)} in {_hms(res['wall_s'])}; ETA {_hms(eta)}")
    if mine is not None:  # a worker: the parent writes the results
        return 1 if any(r.name not in results for r in runs if r.name in mine) else 0
    fp: dict[str, float | None] = {}
    for model in args.models:
        if model in teachers:
            base = next(r for r in runs if r.model == model and r.cfg.quant is not None).cfg
            fp[model] = fp_accuracy(model, teachers[model], base, work)
        else:
            fp[model] = _acc(results, fp_runs[model].name)
    doc = summarize(args, runs, results, fp, teachers, command, estimate)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "accuracy.json", json.dumps(doc, indent=1))
    notes = out_dir / "accuracy_findings.md"
    _write_atomic(out_dir / "accuracy.md", markdown(doc, runs, results,
                                                    notes.read_text() if notes.is_file() else None))
    plot(doc, out_dir / "accuracy.png")
    missing = [r.name for r in runs if r.name not in results]
    _log(work, f"wrote {out_dir / 'accuracy.json'}, accuracy.md, accuracy.png"
               + (f"; {len(missing)} run(s) not finished: {', '.join(missing)}" if missing else ""))
    return 1 if missing and not args.report_only else 0


if __name__ == "__main__":
    sys.exit(main())
