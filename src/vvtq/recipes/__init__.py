"""The training recipes shipped with vvtq (YAML package data), found by name.

``vvtq train --config NAME`` takes a shipped recipe's name (``mini_deit_w2a2_vvtq``, with or without ``.yaml``) or
the path of any recipe file; a file that exists wins over a shipped name. ``vvtq recipes`` lists the shipped
recipes with their one-line descriptions (the first comment line of each file). The files are read through
``importlib.resources``, so they are found from a plain (non-editable) install as well as from a checkout.
"""
from __future__ import annotations

import difflib
from importlib.resources import files
from pathlib import Path

from ..errors import ConfigError

SUFFIX = ".yaml"


def _folder():
    """The recipes' folder inside the installed package (an ``importlib.resources`` traversable)."""
    return files(__name__)


def recipe_names() -> list[str]:
    """The names of the shipped recipes (file names without ``.yaml``), sorted."""
    return sorted(entry.name[: -len(SUFFIX)] for entry in _folder().iterdir()
                  if entry.name.endswith(SUFFIX) and entry.is_file())


def recipe_text(name: str) -> str:
    """The YAML text of the shipped recipe ``name`` (``.yaml`` optional); ``ConfigError`` if there is none."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if stem not in recipe_names():
        raise ConfigError(f"no shipped recipe named {name!r}{_suggest(stem)}")
    return (_folder() / f"{stem}{SUFFIX}").read_text(encoding="utf-8")


def describe(text: str) -> str:
    """A recipe's one-line description: its first comment line, without the ``#``."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        if stripped:
            break
    return ""


def list_recipes() -> list[tuple[str, str]]:
    """``(name, description)`` of every shipped recipe, sorted by name."""
    return [(name, describe(recipe_text(name))) for name in recipe_names()]


def read_recipe(spec: str | Path) -> tuple[str, str]:
    """``(where, text)`` of a recipe given as a file path or a shipped recipe's name.

    A file that exists wins; otherwise ``spec`` is looked up among the shipped recipes (with or without
    ``.yaml``). Neither: one ``ConfigError`` naming the closest shipped recipes.
    """
    path = Path(spec)
    if path.is_file():
        return str(path), path.read_text(encoding="utf-8")
    name = str(spec)
    stem = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    looks_like_path = path.parent != Path(".") or name.endswith((".yml", ".json"))
    if not looks_like_path and stem in recipe_names():
        return f"recipe {stem}", recipe_text(stem)
    kind = "no such file" if looks_like_path else "no such file, and no shipped recipe of that name"
    raise ConfigError(f"recipe not found: {name} ({kind}){_suggest(stem)}")


def _suggest(stem: str) -> str:
    """``"; close names: a, b"`` for the shipped recipes nearest to ``stem``, or where to find the list."""
    names = recipe_names()
    if stem in names:
        return f"; the shipped recipe {stem!r} is found by its name: --config {stem}"
    close = difflib.get_close_matches(stem, names, n=5, cutoff=0.6)
    if close:
        return f"; close names: {', '.join(close)}"
    return f"; `vvtq recipes` lists the {len(names)} shipped recipes"
