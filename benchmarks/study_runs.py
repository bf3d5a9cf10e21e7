"""Resumable studies of many training runs: a run's identity, claiming it, training it, storing its result.

A finished run is ``STORE/<name>.json`` plus its metrics (gzip JSONL), committed with the results; an unfinished one
continues bit-exactly from ``WORK/<name>/last.safetensors``. ``spawn`` starts worker processes that claim runs one
at a time (``WORK/<name>/claim``), so no worker ever waits for another. Used by ``accuracy_v2.py`` and ``cifar10.py``.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class StudyError(RuntimeError):
    """The plan, a stored result or an input does not fit."""


@dataclass
class Run:
    name: str
    model: str
    group: str  # pilot, main, ablation, bits
    recipe: str  # factor string
    bits: int
    seed: int
    cfg: Any  # TrainConfig
    aliases: set[str] = field(default_factory=set)  # every recipe string planned as this same training

    def is_(self, model: str, recipe: str, bits: int, seed: int) -> bool:
        return (self.model, self.bits, self.seed) == (model, bits, seed) and recipe in self.aliases | {self.recipe}


def signature(cfg: dict[str, Any]) -> str:
    """What makes two runs the same training: the config without bookkeeping, defaults dropped."""
    from vvtq.train import TrainConfig

    default = TrainConfig().to_dict()
    keep = {k: v for k, v in relative(cfg).items() if k not in ("out", "progress", "ckpt_every_steps", "log_every")
            and plain(default.get(k, object())) != v}
    return json.dumps(keep, sort_keys=True)


def plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def relative(obj: Any) -> Any:
    """``obj`` (JSON-able) with every path inside the repository written relative to it: results are portable."""
    return json.loads(json.dumps(obj).replace(json.dumps(str(ROOT) + os.sep)[1:-1], ""))


# --------------------------------------------------------------------------- running
def log(work: Path, msg: str) -> None:
    line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
    print(line, flush=True)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "progress.log", "a") as f:
        f.write(line + "\n")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def stored(run: Run, store: Path) -> dict[str, Any] | None:
    """The finished result of ``run`` in the store, or None; a stored result of another config is an error."""
    path = store / f"{run.name}.json"
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    if signature(res["config"]) != signature(run.cfg.to_dict()):
        raise StudyError(f"{path} holds a run of another config; move it away to rerun {run.name}")
    return res


def claim(run: Run) -> bool:
    """Take ``run`` for this worker (atomic create, holding its pid); False if another worker has it."""
    run_dir = Path(run.cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run_dir / "claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def clear_stale_claims(work: Path, marker: bytes) -> None:
    """Remove the claims of workers that no longer run (another invocation's live workers keep theirs). A claim
    without a pid, with this process's own, or whose pid now belongs to another program is stale."""
    for c in work.glob("*/claim"):
        try:
            pid = int(c.read_text() or 0)
        except ValueError:
            pid = 0
        cmdline = Path(f"/proc/{pid}/cmdline")
        if pid > 0 and pid != os.getpid() and _alive(pid) and (not cmdline.parent.is_dir() or
                                                              marker in cmdline.read_bytes()):
            continue
        c.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _osc_last(metrics: Path, key: str) -> float | None:
    value = None
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        rec = json.loads(line)
        if rec.get("type") == "step" and key in rec:
            value = float(rec[key])
    return value


def execute(run: Run, store: Path, work: Path) -> dict[str, Any] | None:
    """Train (or continue) one run and store its result; None if it failed (the study goes on)."""
    import yaml

    from vvtq.train import train

    out = Path(run.cfg.out)
    resume = (out / "last.safetensors").is_file()
    if resume:
        old = yaml.safe_load((out / "config.yaml").read_text())
        if signature(old) != signature(run.cfg.to_dict()):
            raise StudyError(f"{out} holds an unfinished run of another config; delete it to rerun {run.name}")
    t0 = time.time()
    try:
        res = train(run.cfg, resume=resume)
    except Exception as exc:  # reported; the other runs go on
        log(work, f"FAILED {run.name}: {type(exc).__name__}: {exc}")
        write_atomic(out / "failed.txt", f"{type(exc).__name__}: {exc}\n")
        return None
    metrics = out / "metrics.jsonl"
    result = {"name": run.name, "model": run.model, "group": run.group, "recipe": run.recipe, "bits": run.bits,
              "seed": run.seed, "num_crops": run.cfg.num_crops, "steps": res["step"],
              "crops": res["step"] * run.cfg.batch_size, "scored_on": run.cfg.val_split,
              "final_acc": res["final_acc"], "best_acc": res["best_acc"], "wall_s": round(time.time() - t0, 1),
              "resumed": resume, "osc_lowbit": _osc_last(metrics, "osc/lowbit"),
              "osc_overall": _osc_last(metrics, "osc/overall"), "frozen": _osc_last(metrics, "osc/frozen"),
              "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0), "config": relative(run.cfg.to_dict())}
    gzip_copy(metrics, store / f"{run.name}.metrics.jsonl.gz")
    write_atomic(store / f"{run.name}.json", json.dumps(result, indent=1))
    return result


def work_loop(runs: list[Run], store: Path, work: Path, worker: str) -> int:
    """Claim and train runs until none is left; returns the number that failed."""
    failed = 0
    for i, run in enumerate(runs, 1):
        if stored(run, store) is not None or not claim(run):
            continue
        log(work, f"{worker} [{i}/{len(runs)}] {run.name}: starting"
                   + (" (continuing)" if (Path(run.cfg.out) / "last.safetensors").is_file() else ""))
        res = execute(run, store, work)
        if res is None:
            failed += 1
            continue
        log(work, f"{worker} [{i}/{len(runs)}] {run.name}: {res['scored_on']} top-1 {res['final_acc']:.2f}% "
                   f"osc {res['osc_lowbit']} in {res['wall_s']:.0f} s")
    return failed


def spawn(args: argparse.Namespace, argv: list[str], work: Path, script: Path) -> list[int]:
    """``args.jobs`` processes of ``script`` (``argv`` plus ``--worker K``), each claiming runs; stale claims (no
    worker runs now) are cleared first."""
    clear_stale_claims(work, script.name.encode())
    cleaned, skip = [], False
    for a in argv:
        if skip or a == "--jobs":
            skip = not skip
            continue
        if not a.startswith("--jobs="):
            cleaned.append(a)
    procs = []
    for k in range(args.jobs):
        with open(work / f"worker{k}.log", "a") as log_file:
            procs.append(subprocess.Popen([sys.executable, str(script.resolve()), *cleaned, "--worker",
                                           str(k)], stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
                                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}))
        log(work, f"worker {k}: pid {procs[-1].pid}, log {work / f'worker{k}.log'}")
    return [p.wait() for p in procs]


# --------------------------------------------------------------------------- results
def mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.fmean(vals), 3) if vals else None


def fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def gzip_copy(src: Path, dst: Path, unzip: bool = False) -> None:
    """Write ``src`` gzipped to ``dst`` (or, with ``unzip``, ``src`` gunzipped), atomically; the gzip header holds
    no time or name, so the same text gives the same bytes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    with (gzip.open if unzip else open)(src, "rb") as f, open(tmp, "wb") as raw:
        if unzip:
            shutil.copyfileobj(f, raw)
        else:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as g:
                shutil.copyfileobj(f, g)
    os.replace(tmp, dst)


def checkpoint_accuracy(path: Path | list[Path], split: str, holdout: int, cache: Path, name: str,
                        limit: int | None = None, flip: bool = False) -> float:
    """Top-1 (%) of the FP checkpoint ``path`` (several: their ensemble; ``flip``: each image and its mirror) on
    ``split`` of its own dataset (``holdout`` images held out; the first ``limit`` images only), cached in
    ``cache`` under ``name`` and the files' hashes."""
    import torch

    from vvtq.data import SubsetImageDataset
    from vvtq.data.splits import eval_split
    from vvtq.modelio import load_models
    from vvtq.spec import data_source
    from vvtq.train import evaluate
    from vvtq.train.loop import eval_loader

    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    digest = "+".join(hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in paths)
    data = json.loads(cache.read_text()) if cache.is_file() else {}
    key = f"{name}:{split}:{digest}" + (f":{limit}" if limit else "") + (":flip" if flip else "")
    if key not in data:
        net, meta = load_models([str(p) for p in paths], "cpu", flip=flip)
        src = data_source(meta)
        base = eval_split(src.data, split, src.root, holdout)
        if limit:
            base = SubsetImageDataset(base, range(min(limit, len(base))))
        data[key] = evaluate(net, eval_loader(base, meta["img_size"]), torch.device("cpu"))["acc"]
        write_atomic(cache, json.dumps(data, indent=1, sort_keys=True))
    return data[key]


def list_plan(runs: list[Run], store: Path) -> None:
    """Print every run of the plan and whether it is done."""
    for r in runs:
        res = stored(r, store)
        print(f"  {r.name:48s} {r.group:9s} {'done ' + fmt(res['final_acc']) if res else 'to do'}")


def train_all(args: argparse.Namespace, argv: list[str], runs: list[Run], store: Path, work: Path,
              script: Path) -> int:
    """Train every run not stored yet, in ``args.jobs`` workers of ``script`` (or in this process); returns the
    number of failed runs (or of workers that failed)."""
    todo = [r for r in runs if stored(r, store) is None]
    log(work, f"{'pilots' if args.pilots else 'study'}: {len(runs)} runs, {len(todo)} to do, {args.jobs} "
              f"worker(s) x {args.threads} thread(s)")
    if args.jobs > 1:
        codes = spawn(args, argv, work, script)
        log(work, f"workers finished with exit codes {codes}")
        return sum(c != 0 for c in codes)
    clear_stale_claims(work, script.name.encode())
    return work_loop(runs, store, work, "worker 0")


def pilot_table(store: Path) -> list[dict[str, Any]]:
    """The stored pilots (``pilot*.json``), a row each."""
    rows = []
    for path in sorted(store.glob("pilot*.json")):
        r = json.loads(path.read_text())
        rows.append({k: r.get(k) for k in ("name", "model", "recipe", "final_acc", "osc_lowbit", "frozen", "wall_s",
                                            "steps", "crops", "num_crops")})
    return rows


# --------------------------------------------------------------------------- a study's command
def add_runner_arguments(p: argparse.ArgumentParser, pilot_crops: int, quick_help: str, seeds: tuple[int, ...],
                         work: str, store: str, out: str) -> None:
    """The flags every study takes: what to run (pilots or the study, which recipes, seeds), where, how many
    workers, and listing or reporting only."""
    p.add_argument("--pilots", action="store_true", help="run the pilots (held-out images) instead of the study")
    p.add_argument("--recipes", nargs="+", default=None, help="with --pilots: these recipes instead of PILOTS")
    p.add_argument("--pilot-crops", type=int, default=pilot_crops, help=f"crops per pilot (default {pilot_crops:,})")
    p.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--work", default=work, help=f"run folders (default {work})")
    p.add_argument("--store", default=store, help=f"finished runs (default {store})")
    p.add_argument("--out", default=out, help=f"results folder (default {out})")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--list", action="store_true", help="print the plan and what is done, then exit")
    p.add_argument("--report-only", action="store_true", help="write the results from the stored runs")


def study_main(args: argparse.Namespace, argv: list[str], script: Path, plan: Callable, prepare: Callable,
               write_results: Callable) -> int:
    """A study's command after its arguments: plan; unless listing, reporting or working for another process,
    make the runs' inputs (``prepare(args, runs)``) and plan again (a run's config may name an input made only
    now); then list, work as a worker, or train what is missing and write the results (``write_results(args,
    store, out, command)``). Exit status 1 if a run failed."""
    import torch

    torch.set_num_threads(args.threads)
    command = shlex.join(["python", f"benchmarks/{script.name}", *[a for a in argv if a != "--report-only"]])
    work, store, out = Path(args.work), Path(args.store), Path(args.out)
    runs = plan(args)
    if args.worker is None and not (args.list or args.report_only):
        prepare(args, runs)
        runs = plan(args)
    if args.list:
        list_plan(runs, store)
        return 0
    if args.worker is not None:
        return 1 if work_loop(runs, store, work, f"worker {args.worker}") else 0
    failed = 0 if args.report_only else train_all(args, argv, runs, store, work, script)
    doc = write_results(args, store, out, command)
    log(work, f"wrote {out / script.stem}.json, .md, .png; {len(doc['missing'])} study run(s) not finished")
    return 1 if failed else 0


def write_report(out: Path, stem: str, doc: dict[str, Any], store: Path, findings: Path,
                 markdown: Callable, plot: Callable) -> dict[str, Any]:
    """``out/<stem>.json``, ``.md`` (the tables, then ``findings`` if written) and ``.png`` from a summary ``doc``
    and the stored pilots."""
    pilots = pilot_table(store)
    doc["pilots"] = pilots
    write_atomic(out / f"{stem}.json", json.dumps(doc, indent=1))
    write_atomic(out / f"{stem}.md", markdown(doc, pilots, findings.read_text() if findings.is_file() else None))
    plot(doc, pilots, out / f"{stem}.png")
    return doc


def train_and_ship(jobs: list[tuple[str, list[str], Path, Callable[[], None]]], work: Path) -> None:
    """Train FP models side by side, one process each (``(name, command, log file, ship)``, run from the
    repository root), then ``ship()`` each that finished; a failed one stops the others (they resume from their
    checkpoints) and is a StudyError naming its log."""
    procs = []
    for name, cmd, log_path, ship in jobs:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log_file:
            procs.append((name, log_path, ship, subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                                                 cwd=ROOT)))
        log(work, f"training FP {name} (log {log_path})")
    for name, log_path, ship, p in procs:
        if p.wait() != 0:
            for *_, other in procs:
                if other.poll() is None:
                    other.terminate()
                    other.wait()
            raise StudyError(f"FP {name} failed: see {log_path}")
        ship()
