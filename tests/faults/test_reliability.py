"""The reliability tables of docs/reliability.md stay true: every test they name exists, and every test of the
reliability files is named there."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
README = (TESTS.parent / "docs" / "reliability.md").read_text(encoding="utf-8")
BLOCK = README.split("<!-- reliability:begin -->")[1].split("<!-- reliability:end -->")[0]
RELIABILITY_FILES = ("test_faults_train.py", "test_integrity.py", "test_bad_input.py", "test_disk_full.py",
                     "test_ddp_faults.py", "test_campaign.py", "test_fsync_audit.py", "test_line.py",
                     "test_fuzz.py", "test_read_only.py", "test_mounts_without_root.py")


def _path(file: str) -> Path:
    """The test file of that name in the wing folder that holds it (the table names files, not folders)."""
    found = list(TESTS.rglob(file))
    assert len(found) == 1, f"{file}: {len(found)} files of that name under tests/"
    return found[0]


def _test_functions(file: str) -> set[str]:
    tree = ast.parse(_path(file).read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_table_names_exists():
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)", BLOCK)
    assert len(named) > 40
    for file, name in named:
        assert name in _test_functions(file), f"README names {file}::{name}, which does not exist"


def test_every_reliability_test_is_in_the_table():
    for file in RELIABILITY_FILES:
        for name in _test_functions(file):
            assert f"`{file}::{name}" in BLOCK, f"{file}::{name} is missing from the README's reliability table"


def test_every_parametrized_case_the_table_names_is_collected():
    named = set(re.findall(r"`(test_\w+\.py::test_\w+\[[^\]]+\])`", BLOCK))
    files = sorted({n.split("::")[0] for n in named})
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *(str(_path(f)) for f in files)], capture_output=True, text=True, cwd=TESTS.parent)
    ids = {line.split("::", 1)[0].rsplit("/", 1)[-1] + "::" + line.split("::", 1)[1]
           for line in collected.stdout.splitlines() if "::" in line}
    assert named and not named - ids, f"README names cases that are not collected: {sorted(named - ids)}"
