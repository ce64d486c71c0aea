"""`incr init | status | verify` through the CLI: output, JSON, refusals and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.cli.workspace_cmd import workspace_status
from incr_cli.store.workspace import Workspace, base_manifest, seal_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run(runner: CliRunner, *args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_init_writes_a_complete_workspace(runner, tmp_path, tiny_recipe_path):
    ws_dir = tmp_path / "ws"
    result = run(runner, "init", ws_dir, "--base", "scratch:tiny", "--recipe", tiny_recipe_path, "train.steps=7")
    assert result.exit_code == 0, result.output
    assert "v0000" in result.output and "LATEST" in result.output
    ws = Workspace.open(ws_dir)
    assert ws.latest() == "v0000" and ws.versions() == ["v0000"]
    manifest = ws.verify_version("v0000")
    assert manifest["recipe"]["train"]["steps"] == 7 and manifest["status"] == "base" and manifest["promoted"]
    assert "steps: 7" in ws.recipe_path.read_text()
    assert not list(ws.staging.glob("tmp-*"))


def test_init_json_from_a_headless_local_dir(runner, tmp_path, tiny_recipe_path):
    from conftest import write_tiny_model_dir

    model_dir = write_tiny_model_dir(tmp_path / "encoder", with_head=False)
    result = run(runner, "init", tmp_path / "ws", "--base", model_dir, "--recipe", tiny_recipe_path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["version"] == "v0000" and report["head_initialised"] is True
    assert report["source"]["kind"] == "local"


def test_init_says_when_the_head_was_initialised(runner, tmp_path, tiny_recipe_path):
    from conftest import write_tiny_model_dir

    model_dir = write_tiny_model_dir(tmp_path / "encoder", with_head=False)
    result = run(runner, "init", tmp_path / "ws", "--base", model_dir, "--recipe", tiny_recipe_path)
    assert result.exit_code == 0 and "no MLM head" in result.output


def test_init_refuses_overwrite_and_force_replaces(runner, tiny_workspace):
    ws = tiny_workspace
    (ws.data / "d0001-x").mkdir(parents=True)
    (ws.latest_path).write_text("v0000\n")
    result = run(runner, "init", ws.root, "--base", "scratch:tiny")
    assert result.exit_code == 2 and "--force" in result.output
    assert (ws.data / "d0001-x").is_dir()  # nothing touched

    result = run(runner, "init", ws.root, "--base", "scratch:tiny", "--force", "model.max_seq_len=32")
    assert result.exit_code == 0, result.output
    assert not ws.data.exists() and ws.versions() == ["v0000"] and "max_seq_len: 32" in ws.recipe_path.read_text()


def test_force_never_wipes_a_directory_that_is_not_a_workspace(runner, tmp_path):
    (tmp_path / "mine" / "data").mkdir(parents=True)
    result = run(runner, "init", tmp_path / "mine", "--base", "scratch:tiny", "--force")
    assert result.exit_code == 2 and "not an incr workspace" in result.output
    assert (tmp_path / "mine" / "data").is_dir()


@pytest.mark.parametrize("args, message", [
    (["--base", "scratch:nope"], "unknown preset"),
    (["--base", "./no/such/dir"], "no such directory"),
    (["--base", "scratch:tiny", "train.lr=-1"], "train.lr"),
    (["--base", "scratch:tiny", "--recipe", "missing.yaml"], "file not found"),
])
def test_init_usage_errors_exit_2_and_write_nothing(runner, tmp_path, args, message):
    result = run(runner, "init", tmp_path / "ws", *args)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "ws").exists()  # a failed first init leaves no directory behind


def test_pickle_base_needs_allow_pickle(runner, tmp_path):
    from conftest import write_tiny_model_dir

    model_dir = write_tiny_model_dir(tmp_path / "pickled", pickle=True)
    result = run(runner, "init", tmp_path / "ws", "--base", model_dir)
    assert result.exit_code == 2 and "--allow-pickle" in result.output
    result = run(runner, "init", tmp_path / "ws", "--base", model_dir, "--allow-pickle")
    assert result.exit_code == 0 and "warning:" in result.output and "pickle" in result.output


def _fake_increment(ws: Workspace, inc: str, sequences: int) -> None:
    folder = ws.increment_dir(inc)
    folder.mkdir(parents=True)
    (folder / "train.bin").write_bytes(b"\0" * 4)
    seal_folder(folder, base_manifest("increment", id=inc, sequences={"train": sequences, "heldout": 1},
                                      tokens={"train": sequences * 64, "heldout": 64}))


def test_status_lists_versions_and_pending_increments(runner, tiny_workspace):
    ws = tiny_workspace
    _fake_increment(ws, "d0001-austen", 12)
    result = run(runner, "status", ws.root)
    assert result.exit_code == 0, result.output
    assert "v0000 *" in result.output and "base" in result.output and "d0001-austen" in result.output
    assert "pending increments: d0001-austen" in result.output

    report = json.loads(run(runner, "status", ws.root, "--json").stdout)
    assert report["latest"] == "v0000" and report["pending"] == ["d0001-austen"]
    (version,) = report["versions"]
    assert version["parent"] is None and version["status"] == "base" and version["size_bytes"] > 0
    assert report["increments"][0]["sequences"]["train"] == 12


def test_status_survives_an_unreadable_version(tiny_workspace):
    ws = tiny_workspace
    broken = ws.checkpoints / "v0001"
    broken.mkdir()
    (broken / "manifest.json").write_text("{oops")
    report = workspace_status(ws)
    assert [v["status"] for v in report["versions"]] == ["base", "unreadable"]
    assert "cannot be parsed" in report["versions"][1]["problem"]


def test_verify_ok_then_names_the_damaged_file(runner, tiny_workspace):
    ws = tiny_workspace
    _fake_increment(ws, "d0001-austen", 3)
    result = run(runner, "verify", ws.root)
    assert result.exit_code == 0 and "2 folders verified" in result.output

    (ws.increment_dir("d0001-austen") / "train.bin").write_bytes(b"\1" * 4)
    (ws.version_dir("v0000") / "tokenizer.json").unlink()
    result = run(runner, "verify", ws.root, "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert not report["ok"] and [c["id"] for c in report["checked"] if not c["ok"]] == ["v0000", "d0001-austen"]
    assert "v0000: file tokenizer.json is missing" in result.output
    assert "d0001-austen: file train.bin does not match" in result.output


def test_verify_all_checks_every_version(runner, tiny_workspace):
    ws = tiny_workspace
    import shutil

    shutil.copytree(ws.version_dir("v0000"), ws.checkpoints / "v0001")  # LATEST stays v0000
    manifest = ws.version_dir("v0001") / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format": 1', '"format": 2'))
    assert run(runner, "verify", ws.root).exit_code == 0  # LATEST only
    result = run(runner, "verify", ws.root, "--all")
    assert result.exit_code == 2 and "format 2 is newer" in result.output


def test_commands_on_a_non_workspace_exit_2(runner, tmp_path):
    for command in ("status", "verify"):
        result = run(runner, command, tmp_path / "nope")
        assert result.exit_code == 2 and "incr init" in result.output


def test_real_subprocess_init_status_and_lock(tmp_path, tiny_recipe_path):
    """The installed entry point end to end, and a held lock making init exit 75."""
    ws_dir = tmp_path / "ws"
    cmd = [sys.executable, "-m", "incr_cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*cmd, "init", str(ws_dir), "--base", "scratch:tiny", "--recipe", str(tiny_recipe_path),
                           "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == "v0000"
    assert "LOAD REPORT" not in done.stderr and "Traceback" not in done.stderr

    done = subprocess.run([*cmd, "status", str(ws_dir)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "LATEST: v0000" in done.stdout

    with Workspace(ws_dir).lock("ingest"):
        done = subprocess.run([*cmd, "init", str(ws_dir), "--base", "scratch:tiny", "--force"],
                              capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 75, done.stderr
    assert f"PID {os.getpid()}" in done.stderr and "Traceback" not in done.stderr
    assert Workspace.open(ws_dir).verify_version("v0000")  # the refused --force changed nothing
