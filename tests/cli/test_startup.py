"""`incr --help` and `incr status` start light: neither imports torch nor transformers (they cost
about 3 s of a 2-core machine's start; the commands that need them import them in their bodies)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")

PROBE = """
import json, sys
from incr_cli.cli.app import main
sys.argv = ["incr", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)), file=sys.stderr)
"""


def heavy_imports(args: list[str]) -> list[str]:
    """The heavy libraries a fresh interpreter has loaded after running ``incr ARGS``."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(args)],
                          capture_output=True, text=True, timeout=120)
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["train-increment", "--help"], ["eval", "--help"]])
def test_help_imports_neither_torch_nor_transformers(args):
    assert heavy_imports(args) == []


def test_status_imports_neither_torch_nor_transformers(one_pending):
    assert heavy_imports(["status", str(one_pending.root)]) == []


def test_the_probe_sees_a_heavy_import(one_pending):
    """The probe above can fail: a command that does need the model (fill-mask) is seen loading both."""
    assert heavy_imports(["fill-mask", str(one_pending.root), "the [MASK] was long"]) == ["torch", "transformers"]


def test_ingest_loads_a_tokenizer_without_torch(one_pending, tmp_path):
    """Ingest needs the tokenizer, not a model: transformers, never torch (about 1.3 s and 200 MB saved)."""
    text = tmp_path / "more.txt"
    text.write_text("".join(f"a fresh line of text number {i} for the tokenizer\n" for i in range(30)))
    assert heavy_imports(["ingest", str(one_pending.root), str(text), "--name", "more"]) == ["transformers"]
