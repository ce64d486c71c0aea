"""The package's shape, read statically (ast; nothing is imported): wings that follow the data flow,
imports only downward between them and no cycle, short functions, no private name taken across
modules, and a map of the wings in docs/architecture.md that lists every module.

Imports counted: every ``import incr_cli...`` / ``from incr_cli... import`` anywhere in a module, at
the top, inside a function, or under ``if TYPE_CHECKING:`` (a cycle for the type checker is a cycle).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "incr_cli"
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
MAX_FUNCTION_LINES = 60
# Functions allowed to be longer than MAX_FUNCTION_LINES, each with the reason. Keep this empty
# where possible: a long function is a sign it does more than one thing.
LONG_FUNCTION_EXCEPTIONS: dict[str, str] = {}

# The wings, lowest first: a module may import from its own wing, from a lower one, and from the
# ground (the package's top-level modules, which import only each other). The order is the data flow.
GROUND = ("errors", "faults", "progress")
WINGS = ("config", "store", "runtime", "model", "data", "training", "scoring", "methods", "tracking", "line", "api",
         "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The incr_cli module ``name`` refers to (``incr_cli.x.y`` may be an attribute of ``incr_cli.x``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_in(source: str) -> set[str]:
    """The incr_cli modules ``source`` imports at run time (function-level imports included)."""
    tree = ast.parse(source)
    found: set[str | None] = set()
    for node in ast.walk(tree):
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


def test_imports_are_read_inside_functions_and_under_type_checking():
    source = ("from typing import TYPE_CHECKING\nfrom incr_cli.errors import UsageError\n"
              "if TYPE_CHECKING:\n    from incr_cli.config.recipe import Recipe\n"
              "def f():\n    from incr_cli.model import weights\n    import incr_cli.line.increment\n")
    assert imports_in(source) == {"incr_cli.errors", "incr_cli.config.recipe", "incr_cli.model.weights",
                                  "incr_cli.line.increment"}


def wing_of(module: str) -> str:
    """``store`` for incr_cli.store.files, ``ground`` for incr_cli.errors (and the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "ground"


def test_every_module_is_in_a_wing_or_the_ground():
    stray = [m for m in MODULES if wing_of(m) not in WINGS and m not in
             {"incr_cli", "incr_cli.__main__", *(f"incr_cli.{g}" for g in GROUND)}]
    assert not stray, f"modules outside every wing (add a wing to WINGS, or move them): {stray}"


def test_imports_point_down_the_wings():
    rank = {w: i for i, w in enumerate(WINGS)}
    upward = []
    for module, deps in GRAPH.items():
        if module == "incr_cli.__main__":
            continue
        if module == "incr_cli":  # the package's face: it hands out the API (lazily), and imports nothing else
            assert deps <= {"incr_cli.api"}, deps
            continue
        wing = wing_of(module)
        for dep in deps:
            dep_wing = wing_of(dep)
            if dep_wing == "ground" or dep_wing == wing:
                continue
            if wing == "ground" or rank[dep_wing] > rank[wing]:
                upward.append(f"{module} ({wing}) imports {dep} ({dep_wing})")
    assert not upward, "imports that point up the wings (move the module, or the code): " + "; ".join(sorted(upward))


def test_the_wing_rule_catches_an_upward_import():
    """The rule above, on a made-up graph: store importing from training is refused."""
    rank = {w: i for i, w in enumerate(WINGS)}
    assert rank[wing_of("incr_cli.training.step")] > rank[wing_of("incr_cli.store.files")]
    assert wing_of("incr_cli.errors") == "ground" and wing_of("incr_cli.cli") == "cli"


def _private_imports() -> list[str]:
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("incr_cli"):
                found += [f"{module} imports {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_name_is_imported_across_modules():
    assert not _private_imports(), "private names taken across modules (make them public): " + "; ".join(
        _private_imports())


def _architecture_modules() -> list[str]:
    block = ARCHITECTURE[ARCHITECTURE.index("<!-- modules:begin -->"):ARCHITECTURE.index("<!-- modules:end -->")]
    return re.findall(r"^\| `([^`]+)` \|", block, flags=re.M)


def test_the_tests_mirror_the_wings():
    """One folder of tests a wing, plus faults/, docs/ and project/; no test file left at the top."""
    tests = ROOT / "tests"
    assert not list(tests.glob("test_*.py")), "a test file at tests/: move it into its wing's folder"
    folders = {p.parent.name for p in tests.rglob("test_*.py")}
    assert folders <= set(WINGS) | {"faults", "docs", "project"}, folders - set(WINGS)
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), "two test files of one name (pytest imports them by basename)"


def test_the_architecture_page_lists_every_module_in_wing_order():
    listed = _architecture_modules()
    actual = [str(p.relative_to(PACKAGE)) for m, p in MODULES.items() if m not in ("incr_cli", "incr_cli.__main__")]
    assert len(listed) == len(set(listed)), "a module is listed twice in docs/architecture.md"
    assert set(listed) == set(actual), (f"docs/architecture.md lacks {sorted(set(actual) - set(listed))} and lists "
                                        f"{sorted(set(listed) - set(actual))}, which do not exist")
    order = [*WINGS[::-1], "ground"]  # the page lists the top wing first, as the house is drawn
    wings = [p.split("/")[0] if "/" in p else "ground" for p in listed]
    assert wings == sorted(wings, key=order.index), "docs/architecture.md lists the wings out of order"


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


MAX_PARAMETERS = 6  # more is a sign that some belong together in a small frozen dataclass (or two jobs in one)


def _parameter_counts() -> dict[str, int]:
    counts = {}
    for name, path, node in _functions():
        if path.relative_to(PACKAGE).parts[0] in ("cli", "api"):  # their parameters are the commands' options
            continue
        a = node.args
        counts[name] = max(counts.get(name, 0), len([x for x in a.posonlyargs + a.args if x.arg not in ("self", "cls")])
                           + len(a.kwonlyargs))
    return counts


def test_no_function_takes_more_than_six_parameters():
    """Keyword-only settings that belong together travel as one frozen dataclass (``EvalGrid``,
    ``IngestOptions``, ``Placement``, ``RunSpec`` ...). The CLI's commands and the API's functions are left
    out: they take one parameter per option the user sets."""
    over = {name: n for name, n in _parameter_counts().items() if n > MAX_PARAMETERS}
    assert not over, f"functions over {MAX_PARAMETERS} parameters (group settings in a frozen dataclass): {over}"


# ----------------------------------------------------------------------------- deferred imports

# What a module of the package may defer to a function: a library that costs seconds to import.
HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "pyarrow", "sklearn", "mlflow", "tensorboard",
         "datasets", "huggingface_hub", "scipy", "jieba", "matplotlib")


def _top_level_imports(module: str) -> set[str]:
    """What importing ``module`` runs: its top-level imports (TYPE_CHECKING blocks left out), as names."""
    names: set[str] = set()
    for node in ast.parse(MODULES[module].read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _heavy_loaded(module: str, _visiting: set[str] | None = None) -> frozenset[str]:
    """The heavy libraries importing ``module`` loads, through the package's own modules too."""
    if module in _HEAVY_LOADED:
        return _HEAVY_LOADED[module]
    visiting = _visiting if _visiting is not None else set()
    visiting.add(module)
    found: set[str] = set()
    parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    for name in _top_level_imports(module) | (parents & set(MODULES)):
        if name.split(".")[0] in HEAVY:
            found.add(name.split(".")[0])
        elif name.startswith("incr_cli") and (dep := _resolve(name)) and dep not in visiting:
            found |= _heavy_loaded(dep, visiting)
    visiting.discard(module)
    _HEAVY_LOADED[module] = frozenset(found)
    return _HEAVY_LOADED[module]


_HEAVY_LOADED: dict[str, frozenset[str]] = {}


def _deferred_imports() -> list[tuple[str, str, str]]:
    """(module, function, imported module) for each import of the package's own modules inside a
    function, outside the CLI and the API (whose commands and functions import what they run)."""
    out = []
    for module, path in MODULES.items():
        if module.split(".")[1:2] in (["cli"], ["api"]) or module == "incr_cli":
            continue
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("incr_cli."):
                        out += [(module, fn.name, _resolve(f"{node.module}.{a.name}")) for a in node.names]
    return out


def test_a_deferred_import_keeps_a_heavy_library_out_of_its_module():
    """A function-level import of the package's own module is there to keep torch, transformers (...)
    off a path that does not need them; one that adds no heavy library belongs at the top."""
    pointless = [f"{m}:{fn} imports {dep}" for m, fn, dep in _deferred_imports()
                 if not _heavy_loaded(dep) - _heavy_loaded(m)]
    assert not pointless, "move to the module's top (it defers nothing heavy): " + "; ".join(pointless)


def test_a_wing_that_defers_imports_says_why_at_its_top():
    wings = {m.split(".")[1] for m, _, _ in _deferred_imports()}
    silent = [w for w in sorted(wings) if "Why" not in (PACKAGE / w / "__init__.py").read_text(encoding="utf-8")]
    assert not silent, f"say once, in the wing's __init__.py docstring, why it defers imports: {silent}"
