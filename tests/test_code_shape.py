"""The shape of the product code: no function in flows/, tasks/, backends/, model_src/ or
deployments/ is longer than MAX_FUNCTION_LINES, so that each reads as one step. A function
counts from its ``def`` line to its last line, its docstring, comments and nested functions
included. Also runnable on its own: ``python tests/test_code_shape.py`` lists them."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT_PACKAGES = ("flows", "tasks", "backends", "model_src", "deployments")
MAX_FUNCTION_LINES = 60


def long_functions(root: Path = REPO, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (n lines)`` for every function over ``limit`` lines, longest first."""
    found: list[tuple[int, str]] = []
    for package in PRODUCT_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        where = f"{path.relative_to(root)}:{node.lineno}"
                        found.append((lines, f"{where} {node.name} ({lines} lines)"))
    return [text for _, text in sorted(found, key=lambda f: -f[0])]


def test_no_product_function_is_longer_than_the_limit():
    too_long = long_functions()
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines (split them into named "
                          "steps):\n  " + "\n  ".join(too_long))


def test_the_check_finds_a_long_function(tmp_path):
    (tmp_path / "flows").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = f"def short():\n    pass\n\n\ndef long():\n{body}\n"
    (tmp_path / "flows" / "long.py").write_text(source)
    assert long_functions(tmp_path) == [f"flows/long.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]


if __name__ == "__main__":
    listed = long_functions()
    print("\n".join(listed) or f"no function over {MAX_FUNCTION_LINES} lines")
    sys.exit(1 if listed else 0)
