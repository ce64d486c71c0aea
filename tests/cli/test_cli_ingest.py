"""`incr ingest` through typer's CliRunner and one real subprocess: output, JSON, exit codes, lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.cli.ingest_cmd import split_overrides
from incr_cli.errors import EXIT_LOCKED, EXIT_USAGE
from incr_cli.store.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _docs(n: int, tag: str) -> str:
    return "".join(f"{tag} number {i} tells a short story about emma and the garden\n" for i in range(n))


def test_split_overrides_keeps_paths_that_exist(tmp_path: Path) -> None:
    odd = tmp_path / "a.b=c"
    odd.write_text("x\n")
    assert split_overrides(["x.txt", "data.heldout_fraction=0.2", str(odd), "model.max_seq_len=32"]) == (
        ["x.txt", str(odd)], ["data.heldout_fraction=0.2", "model.max_seq_len=32"])


def test_ingest_json_then_nothing_new(tiny_workspace: Workspace, tmp_path: Path) -> None:
    src = tmp_path / "stories.txt"
    src.write_text(_docs(60, "story"), encoding="utf-8")
    ws = str(tiny_workspace.root)
    res = runner.invoke(app, ["ingest", ws, str(src), "--json", "data.heldout_fraction=0.2", "model.max_seq_len=32"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["increment"] == "d0001-stories" and report["documents"]["kept"] == 60
    manifest = tiny_workspace.verify_increment("d0001-stories")
    assert manifest["seq_len"] == 32 and manifest["documents"]["heldout"] == report["documents"]["heldout"] > 0

    res = runner.invoke(app, ["ingest", ws, str(src)])
    assert res.exit_code == 0 and "nothing new" in res.stdout and "d0001-stories" in res.stdout
    assert tiny_workspace.increments() == ["d0001-stories"]


def test_ingest_summary_table_and_skips(tiny_workspace: Workspace, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(_docs(20, "tale"), encoding="utf-8")
    (tmp_path / "in" / "b.bin").write_bytes(b"\x00\x01binary")
    res = runner.invoke(app, ["ingest", str(tiny_workspace.root), str(tmp_path / "in"), "--name", "tales"])
    assert res.exit_code == 0, res.output
    assert "d0001-tales" in res.stdout and "skipped files: binary" in res.stdout and "documents kept" in res.stdout
    assert "skipped 1 path(s)" in res.stderr


def test_ingest_errors_have_exit_codes(tiny_workspace: Workspace, tmp_path: Path) -> None:
    ws = str(tiny_workspace.root)
    res = runner.invoke(app, ["ingest", ws, str(tmp_path / "missing.txt")])
    assert res.exit_code == EXIT_USAGE and "nothing readable" in res.stderr and "missing.txt" in res.stderr
    res = runner.invoke(app, ["ingest", str(tmp_path), str(tmp_path)])
    assert res.exit_code == EXIT_USAGE and "not an incr workspace" in res.stderr
    res = runner.invoke(app, ["ingest", ws, str(tmp_path), "data.heldout_fractoin=0.2"])
    assert res.exit_code == EXIT_USAGE and "did you mean" in res.stderr
    res = runner.invoke(app, ["ingest", ws, str(tmp_path), "--format", "xml"])
    assert res.exit_code == EXIT_USAGE and "--format" in res.stderr


def test_ingest_refuses_a_locked_workspace(tiny_workspace: Workspace, tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text(_docs(5, "x"), encoding="utf-8")
    with tiny_workspace.lock("train-increment"):
        res = runner.invoke(app, ["ingest", str(tiny_workspace.root), str(src)])
    assert res.exit_code == EXIT_LOCKED and f"PID {os.getpid()}" in res.stderr
    assert tiny_workspace.increments() == []


def test_real_subprocess(tiny_workspace: Workspace, tmp_path: Path) -> None:
    src = tmp_path / "notes.jsonl"
    src.write_text("".join(json.dumps({"body": f"note {i} about the weather in highbury"}) + "\n" for i in range(30))
                   + "{broken\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "incr_cli", "ingest", str(tiny_workspace.root), str(src),
                           "--text-field", "body", "--json"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["increment"] == "d0001-notes"
    assert report["documents"]["kept"] == 30 and report["documents"]["rejected"] == {"malformed_json": 1}
    assert tiny_workspace.pending("v0000") == ["d0001-notes"]
