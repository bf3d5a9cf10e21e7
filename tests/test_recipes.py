"""Recipes shipped as package data: found by name (with or without .yaml), a file path wins, a wrong name is one
clear error; and a built wheel holds every recipe, found by name from a plain (non-editable) install."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from vvtq.recipes import describe, list_recipes, read_recipe, recipe_names, recipe_text
from vvtq.train import ConfigError, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "vvtq" / "recipes"


def _needs_teacher(text: str) -> list[str]:
    """Overrides a recipe needs to validate on its own (the demo's fills in its teacher at run time)."""
    teacher = yaml.safe_load(text).get("teacher") or {}
    return ["teacher.checkpoint=T"] if teacher.get("source") == "live" and not teacher.get("checkpoint") else []


def test_every_recipe_file_is_shipped_and_loads_by_name():
    names = recipe_names()
    assert names == sorted(p.stem for p in SOURCE.glob("*.yaml")) and len(names) >= 25
    assert not (ROOT / "configs").exists()
    for name in names:
        text = (SOURCE / f"{name}.yaml").read_text()
        assert recipe_text(name) == recipe_text(f"{name}.yaml") == text
        sets = _needs_teacher(text)
        by_name = TrainConfig.from_yaml(name, sets)
        assert by_name == TrainConfig.from_yaml(f"{name}.yaml", sets) == TrainConfig.from_recipe(name, sets)
        assert by_name == TrainConfig.from_yaml(SOURCE / f"{name}.yaml", sets)  # by path
        assert describe(text) and not describe(text).startswith("#")


def test_a_file_that_exists_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("mini_deit_fp.yaml").write_text("# mine\nmodel: mini_swin\nimg_size: 32\n")
    assert TrainConfig.from_yaml("mini_deit_fp.yaml").model == "mini_swin"  # the file
    assert TrainConfig.from_yaml("mini_deit_fp").model == "mini_deit"  # no file of that name: the shipped one
    assert TrainConfig.from_recipe("mini_deit_fp.yaml").model == "mini_deit"  # by name only
    assert read_recipe("mini_deit_fp.yaml")[0] == "mini_deit_fp.yaml"


@pytest.mark.parametrize("spec, message", [
    ("mini_deit_w2a2_vvtx", "recipe not found: mini_deit_w2a2_vvtx (no such file, and no shipped recipe of that "
                            "name); close names: mini_deit_w2a2_vvtq"),
    ("mini_deit_fp.yml", "recipe not found: mini_deit_fp.yml (no such file); close names: mini_deit_fp"),
    ("configs/mini_deit_fp.yaml", "the shipped recipe 'mini_deit_fp' is found by its name: --config mini_deit_fp"),
    ("qqqqqq", "`vvtq recipes` lists the"),
])
def test_an_unknown_recipe_is_one_clear_error(spec, message):
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_yaml(spec)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_descriptions_are_first_comment_lines():
    assert describe("# one\n# two\nmodel: x\n") == "one"
    assert describe("\n#  spaced  \n") == "spaced"
    assert describe("model: x\n# late\n") == ""
    rows = dict(list_recipes())
    assert rows["mini_deit_fp"] == describe((SOURCE / "mini_deit_fp.yaml").read_text())


_CHILD = """
import json, sys, yaml
import vvtq
from vvtq.cli import main
from vvtq.demo import QAT_RECIPE, TEACHER_RECIPE
from vvtq.recipes import recipe_names, recipe_text
from vvtq.train import TrainConfig

loaded = {}
for name in recipe_names():
    teacher = yaml.safe_load(recipe_text(name)).get("teacher") or {}
    sets = ["teacher.checkpoint=T"] if teacher.get("source") == "live" and not teacher.get("checkpoint") else []
    loaded[name] = TrainConfig.from_yaml(name, sets).model
TrainConfig.from_recipe(QAT_RECIPE), TrainConfig.from_recipe(TEACHER_RECIPE)
assert main(["recipes"]) == 0
print(json.dumps({"file": vvtq.__file__, "loaded": loaded}))
"""


def test_the_wheel_ships_every_recipe_and_finds_it_by_name(tmp_path):
    """Build the wheel offline from a copy of the source, unpack it as a plain install, and load every recipe by
    name from there (the demo's too), with the working directory elsewhere."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment")
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    shutil.copytree(ROOT / "src", tree / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(tree)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("vvtq-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        shipped = {Path(n).name: z.read(n) for n in z.namelist() if n.startswith("vvtq/recipes/")}
        z.extractall(site)
    sources = {p.name: p.read_bytes() for p in SOURCE.glob("*.yaml")}
    assert {n: b for n, b in shipped.items() if n.endswith(".yaml")} == sources
    run = tmp_path / "elsewhere"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, cwd=run, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.splitlines()[-1])
    assert Path(out["file"]).is_relative_to(site)  # the unpacked wheel, not the source checkout
    assert sorted(out["loaded"]) == sorted(p.stem for p in SOURCE.glob("*.yaml"))
    assert "mini_deit_w2a2_vvtq" in res.stdout


@pytest.mark.parametrize("stem", ["mini_deit_w2a2", "mini_deit_w3a3", "mini_deit_w4a4", "mini_swin_w2a2",
                                  "mini_swin_w3a3", "mini_swin_w4a4"])
def test_the_shipped_families_train_equal_budgets(stem):
    """``*_lsq``, ``*_vvtq`` and ``*_paper`` of one model and bit-width take the same steps of the same crops, so
    that a user comparing them compares recipes, not budgets."""
    import math

    from vvtq.train import TrainConfig

    budgets = set()
    for family in ("lsq", "vvtq", "paper"):
        cfg = TrainConfig.from_recipe(f"{stem}_{family}")
        per_epoch = 60_000 // (cfg.batch_size // cfg.num_crops)  # the loop's plan (train/loop.py, plan_steps)
        budgets.add((math.ceil(cfg.epochs * per_epoch), cfg.batch_size, int(cfg.warmup_epochs * per_epoch)))
    assert len(budgets) == 1, budgets
