"""The Python API: the documented example runs, the results are typed, errors carry exit codes,
the lock is taken, and ``import incr_cli`` stays light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import incr_cli
from incr_cli.errors import EXIT_LOCKED, EXIT_USAGE, IncrError, WorkspaceLocked
from incr_cli.store.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
PAGE = (REPO / "docs" / "python-api.md").read_text(encoding="utf-8")


def test_the_documented_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", PAGE, re.S).group(1)
    (tmp_path / "samples").symlink_to(REPO / "samples")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "v0001 True line/checkpoints/v0001/metrics.json" in out
    assert re.search(r"^v0002 \{'d0001-austen': [\d.]+, 'd0002-pydocs': [\d.]+\}$", out, re.M)
    assert "LATEST v0002 -> v0001" in out or "LATEST v0001 -> v0000" in out  # v0002 promoted, or not
    assert "exit code 2 - nothing readable in no-such-file.txt" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert Workspace.open(tmp_path / "line").latest() in ("v0001", "v0000")


def test_import_is_light_and_the_api_is_at_the_top():
    probe = ("import sys, incr_cli; assert callable(incr_cli.train_increment); "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr
    assert {"init", "ingest", "train_increment", "evaluate", "promote", "rollback", "export"} <= set(dir(incr_cli))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        incr_cli.nope  # noqa: B018


def test_a_rejected_version_is_a_result_not_an_error(tiny_workspace, samples_dir):
    incr_cli.ingest(tiny_workspace.root, [samples_dir / "austen.txt"], name="austen")
    result = incr_cli.train_increment(tiny_workspace.root, overrides=["train.steps=2", "gate.min_improvement=0.99"])
    assert result.version == "v0001" and result.promoted is False and "failed the gate" in result.message
    assert result.metrics_path.is_file() and not result.metrics["gate"]["passed"]
    assert tiny_workspace.latest() == "v0000"
    again = incr_cli.promote(tiny_workspace.root, "v0001", reason="reviewed")
    assert (again.previous, again.latest) == ("v0000", "v0001")


def test_nothing_pending_and_messages(tiny_workspace):
    lines: list[str] = []
    result = incr_cli.train_increment(tiny_workspace.root, on_message=lines.append)
    assert result.version is None and result.metrics_path is None and not result.promoted
    assert "nothing to train" in result.message


def test_errors_carry_the_cli_exit_codes(tiny_workspace, tmp_path):
    with pytest.raises(IncrError) as missing:
        incr_cli.ingest(tiny_workspace.root, [tmp_path / "absent.txt"])
    assert missing.value.exit_code == EXIT_USAGE
    with pytest.raises(IncrError) as not_a_workspace:
        incr_cli.train_increment(tmp_path / "nowhere")
    assert not_a_workspace.value.exit_code == EXIT_USAGE


def test_writers_take_the_lock(tiny_workspace, samples_dir):
    with tiny_workspace.lock("someone else"):
        with pytest.raises(WorkspaceLocked) as locked:
            incr_cli.ingest(tiny_workspace.root, [samples_dir / "austen.txt"])
    assert locked.value.exit_code == EXIT_LOCKED
    assert tiny_workspace.increments() == []
