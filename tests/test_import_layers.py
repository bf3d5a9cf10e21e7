"""The package's import graph: no cycles, and export / analysis never reach the training loop.

The graph is read from the source (every ``import``, at module level or inside a function, except those under
``if TYPE_CHECKING:``), so a lazy import cannot hide a cycle or a layering break.
"""
from __future__ import annotations

import ast
from pathlib import Path

import vvtq

ROOT = Path(vvtq.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The vvtq modules ``path`` imports: ``from pkg import sub`` counts as ``pkg.sub`` when that is a module."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    skip: set[int] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    """Each vvtq module and the vvtq modules it imports."""
    files = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted(m for m in graph if m in _reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_export_and_analysis_never_import_training():
    graph = import_graph()
    for module in graph:
        if module.startswith(("vvtq.export", "vvtq.analysis")):
            reached = sorted(m for m in _reachable(graph, module) if m.startswith("vvtq.train"))
            assert not reached, f"{module} imports {reached}"


def test_model_io_and_evaluation_sit_below_training():
    graph = import_graph()
    for module in ("vvtq.modelio", "vvtq.evaluation", "vvtq.device", "vvtq.checkpoint", "vvtq.spec"):
        reached = sorted(m for m in _reachable(graph, module) if m.startswith("vvtq.train"))
        assert not reached, f"{module} imports {reached}"
