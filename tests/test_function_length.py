"""No function in the package is longer than 90 lines (decorators, docstring and body included): a longer one
does several things and should be split into parts that read top to bottom."""
from __future__ import annotations

import ast
from pathlib import Path

import vvtq

ROOT = Path(vvtq.__file__).parent
MAX_LINES = 90


def long_functions(root: Path = ROOT, limit: int = MAX_LINES) -> list[tuple[str, str, int]]:
    """``(file, function, lines)`` of every function or method under ``root`` longer than ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = node.end_lineno - start + 1
                if lines > limit:
                    found.append((path.relative_to(root.parent).as_posix(), node.name, lines))
    return found


def test_checker_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path) == [(f"{tmp_path.name}/m.py", "long", MAX_LINES + 1)]


def test_no_function_is_longer_than_90_lines():
    found = long_functions()
    assert not found, "functions over 90 lines (split them): " + ", ".join(f"{f}:{n} ({k})" for f, n, k in found)
