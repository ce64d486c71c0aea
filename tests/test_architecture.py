"""The package's shape, read statically (ast; nothing is imported): imports point down the README's
module table with no cycle, functions stay short, and the README lists every module.

Imports counted: every ``import incr_cli...`` / ``from incr_cli... import`` anywhere in a module, at
the top or inside a function. Left out: imports under ``if TYPE_CHECKING:``, which never run and
only name a type for annotations (``masking`` and ``strategy`` use them for the recipe's types).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "incr_cli"
README = (ROOT / "README.md").read_text(encoding="utf-8")
MAX_FUNCTION_LINES = 60
# Functions allowed to be longer than MAX_FUNCTION_LINES, each with the reason. Keep this empty
# where possible: a long function is a sign it does more than one thing.
LONG_FUNCTION_EXCEPTIONS: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return inside


def _resolve(name: str) -> str | None:
    """The incr_cli module ``name`` refers to (``incr_cli.x.y`` may be an attribute of ``incr_cli.x``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_in(source: str) -> set[str]:
    """The incr_cli modules ``source`` imports at run time (function-level imports included)."""
    tree = ast.parse(source)
    skip = _type_checking_nodes(tree)
    found: set[str | None] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "incr_cli":
            for alias in node.names:  # `from incr_cli import models` imports the module models
                found.add(_resolve(f"{node.module}.{alias.name}"))
        elif isinstance(node, ast.Import):
            found.update(_resolve(a.name) for a in node.names if a.name.split(".")[0] == "incr_cli")
    return {m for m in found if m and m != "incr_cli"}


def imports_of(module: str) -> set[str]:
    return imports_in(MODULES[module].read_text(encoding="utf-8")) - {module}


GRAPH = {m: imports_of(m) for m in MODULES}


def _cycle() -> list[str] | None:
    """One import cycle in GRAPH (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for dep in sorted(GRAPH[m]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_inside_the_package():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_are_read_inside_functions_but_not_under_type_checking():
    source = ("from typing import TYPE_CHECKING\nfrom incr_cli.errors import UsageError\n"
              "if TYPE_CHECKING:\n    from incr_cli.recipe import Recipe\n"
              "def f():\n    from incr_cli import models\n    import incr_cli.train\n")
    assert imports_in(source) == {"incr_cli.errors", "incr_cli.models", "incr_cli.train"}


def _readme_modules() -> list[str]:
    block = README[README.index("<!-- modules:begin -->"):README.index("<!-- modules:end -->")]
    return [line.split("|")[1].strip().strip("`") for line in block.splitlines() if line.startswith("| `")]


def _layer_of(module: str) -> str:
    """The README row a module belongs to: ``x.py`` for incr_cli.x, ``cli/`` for the CLI package."""
    parts = module.split(".")
    return f"{parts[1]}/" if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else f"{parts[1]}.py"


def test_readme_module_list_is_the_package():
    listed = _readme_modules()
    actual = {_layer_of(m) for m in MODULES if m not in ("incr_cli", "incr_cli.__main__")}
    assert len(listed) == len(set(listed)), "a module is listed twice in README's module table"
    assert set(listed) == actual, (f"README's module table lacks {sorted(actual - set(listed))} and lists "
                                   f"{sorted(set(listed) - actual)}, which do not exist")


def test_imports_point_down_the_readme_module_table():
    order = {name: i for i, name in enumerate(_readme_modules())}
    upward = []
    for module, deps in GRAPH.items():
        if module in ("incr_cli", "incr_cli.__main__"):
            continue
        layer = _layer_of(module)
        for dep in deps:
            if _layer_of(dep) != layer and order.get(_layer_of(dep), -1) < order.get(layer, -1):
                upward.append(f"{module} imports {dep}")
    assert not upward, ("these imports point up README's module table (move the module, or the code): "
                        + "; ".join(sorted(upward)))


def _functions():
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{module}.{node.name}", path, node


def test_no_function_is_longer_than_sixty_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, path, node in _functions()
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and name not in LONG_FUNCTION_EXCEPTIONS]
    assert not long, f"functions longer than {MAX_FUNCTION_LINES} lines (split them): " + "; ".join(long)


def test_every_long_function_exception_is_still_needed():
    lengths = {name: node.end_lineno - node.lineno + 1 for name, _, node in _functions()}
    stale = [name for name in LONG_FUNCTION_EXCEPTIONS if lengths.get(name, 0) <= MAX_FUNCTION_LINES]
    assert not stale, f"no longer long (or gone): drop their exceptions: {stale}"
