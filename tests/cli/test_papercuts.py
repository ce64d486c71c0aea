"""A new user's first hour (issue 33): each papercut through the real console script, where the
output is the point. One test per item, each of which failed before its fix."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from incr_cli.cli.output import plain_progress
from incr_cli.store.workspace import Workspace
from tests.helpers_train import REPO, excerpt

INCR = Path(sys.executable).parent / "incr"  # the console script `make install` puts beside python


def incr(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(INCR)] if INCR.exists() else [sys.executable, "-m", "incr_cli"]
    base = {k: v for k, v in os.environ.items() if k != "INCR_FAULT"}
    return subprocess.run([*command, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**base, **(env or {})})


@pytest.fixture
def ws(tmp_path, workspace_copy) -> Workspace:
    return workspace_copy("one_pending", tmp_path / "ws")


def test_1_an_override_typo_is_blamed_on_the_command_line_with_a_suggestion(ws):
    typo = incr("train-increment", ws.root, "train.stpes=5")
    assert typo.returncode == 2 and "recipe.yaml" not in typo.stderr
    assert "error: command-line overrides: 1 problem" in typo.stderr
    assert "override train.stpes: unknown key (did you mean 'steps'?)" in typo.stderr
    no_section = incr("train-increment", ws.root, "steps=5")
    assert "expected section.key=value (did you mean 'train.steps=5'?)" in no_section.stderr
    section = incr("train-increment", ws.root, "traim.steps=5")  # a section typo is the command line's too
    assert "error: command-line overrides: 1 problem" in section.stderr
    assert "override traim.steps: unknown section 'traim' (did you mean 'train'?)" in section.stderr
    spaced = incr("train-increment", ws.root, "train.steps", "5")
    assert "(did you mean 'train.steps=5'? no space around =)" in spaced.stderr


def test_2_recipe_validate_reports_its_problems_as_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stpes: 5\n")
    result = incr("recipe", "validate", bad)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {bad}: 1 problem") and "warning" not in result.stderr


def test_3_next_hints_quote_paths_so_they_paste_back(tmp_path):
    root = tmp_path / "my line's ws"
    result = incr("init", root, "--base", "scratch:tiny")
    assert result.returncode == 0, result.stderr
    hint = next(line for line in (result.stdout + result.stderr).splitlines() if "next: incr ingest" in line)
    words = shlex.split(hint.split("next: ", 1)[1])
    assert words[:3] == ["incr", "ingest", str(root)]


def test_4_progress_counts_agree_with_the_summary_and_read_as_numbers(ws, tmp_path):
    text = excerpt("austen.txt", slice(0, 300), tmp_path)
    result = incr("ingest", ws.root, text, "--name", "more", "--json")  # off a terminal: plain lines
    assert result.returncode == 0, result.stderr
    kept = json.loads(result.stdout)["documents"]["kept"]
    reading = [line for line in (result.stdout + result.stderr).splitlines() if "reading:" in line][-1]
    assert f"{kept:,} new docs" in reading and "(100%" in reading
    assert plain_progress("tokenizing", 29000, 1997700, "docs", None, 130) == (
        "tokenizing: 29,000/1,997,700 docs (1.5%, about 2 h 27 min left)")


def test_5_status_does_not_tell_a_running_resume_to_rerun_itself(ws):
    stopped = incr("train-increment", ws.root, "train.steps=4", "runtime.save_every=1",
                   env={"INCR_FAULT": "train.step@2:int"})
    assert stopped.returncode == 130, stopped.stderr
    warned = incr("status", ws.root)
    assert "rerun the same train-increment to resume it" in warned.stderr  # nobody is resuming it yet
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": "train-increment", "started": "now"}
    (ws.root / ".incr.lock").write_text(json.dumps(record))  # a live train-increment holds the lock
    running = incr("status", ws.root)
    assert running.returncode == 0, running.stderr
    assert "rerun the same" not in running.stderr and f"train-increment PID {os.getpid()} is running" in running.stdout


def test_6_and_8_mlflow_is_quiet_and_a_quote_in_the_path_works(tmp_path, workspace_copy):
    pytest.importorskip("mlflow")
    ws = workspace_copy("one_pending", tmp_path / "it's a ws")
    args = ["train.steps=2", "tracking.sinks=[mlflow]", "eval.max_sequences=8"]
    first = incr("train-increment", ws.root, *args)
    assert first.returncode == 0, first.stderr
    assert "INFO" not in first.stderr and "alembic" not in first.stderr, first.stderr[-2000:]
    assert incr("ingest", ws.root, excerpt("fortunes.txt", slice(0, 200), tmp_path), "--name", "f").returncode == 0
    second = incr("train-increment", ws.root, *args)  # searches the store for this workspace's runs
    assert second.returncode == 0, second.stderr[-2000:]
    assert ws.latest() == "v0002"


def test_7_incr_current_names_the_served_version(ws):
    text = incr("current", ws.root)
    assert text.returncode == 0 and text.stdout == f"v0000\t{ws.version_dir('v0000').resolve()}\n"
    doc = json.loads(incr("current", ws.root, "--json").stdout)
    assert doc["version"] == doc["latest"] == "v0000" and doc["is_latest"] and Path(doc["path"]).is_dir()
    ws.current_path.unlink()
    missing = incr("current", ws.root)
    assert missing.returncode == 2 and "missing or not a link" in missing.stderr and "incr promote" in missing.stderr


def test_8_clicks_own_usage_errors_are_clipped(ws):
    result = incr("status", ws.root, "--" + "x" * 5000)
    assert result.returncode == 2 and "No such option" in result.stderr
    assert len(result.stderr) < 1000 and "(5,018 characters)" in result.stderr  # "No such option: --x..."
    assert incr().returncode == 2 and "Usage: incr" in incr().stdout + incr().stderr  # bare `incr`: whole help


def test_9_jsonl_rejections_name_the_fields_found_and_arrays(ws, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": i, "body": f"document number {i} here"}) + "\n" for i in range(3)))
    result = incr("ingest", ws.root, other)
    assert result.returncode == 2
    assert "missing_field: 3); the records' text fields are body: choose one with --text-field" in result.stderr
    array = tmp_path / "array.jsonl"
    array.write_text(json.dumps([{"text": "a whole document in an array"}]) + "\n")
    result = incr("ingest", ws.root, array)
    assert result.returncode == 2 and "not_an_object: 1" in result.stderr and "not an array" in result.stderr
