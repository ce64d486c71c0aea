"""A workspace this process cannot write: every writing command refuses at once (exit 2, the path
named, nothing done); eval scores and prints, keeping nothing. The workspace is a real read-only
filesystem (a bind mount remounted ro), so the errors are the kernel's, not simulated."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from helpers_reliability import mount_read_only

import incr_cli
from incr_cli.errors import UsageError
from incr_cli.store import lock as lock_mod
from incr_cli.store.workspace import Workspace


@pytest.fixture(scope="module")
def read_only_line(tmp_path_factory, tiny_recipe_path, samples_dir):
    """A line with v0001 and a pending increment, seen read-only."""
    root = tmp_path_factory.mktemp("ro")
    incr_cli.init(root / "ws", base="scratch:tiny", recipe=tiny_recipe_path, overrides=["train.steps=3"])
    incr_cli.ingest(root / "ws", [samples_dir / "austen.txt"], name="austen")
    assert incr_cli.train_increment(root / "ws").version == "v0001"
    incr_cli.ingest(root / "ws", [samples_dir / "pydocs.txt"], name="pydocs")
    unmount = mount_read_only(root / "ws", root / "ro")
    yield root / "ro", samples_dir
    unmount()


def _incr(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "incr_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", ["ingest", "train-increment", "promote", "rollback", "gc"])
def test_writers_refuse_a_read_only_workspace(read_only_line, command):
    ws, samples = read_only_line
    args = {"ingest": [samples / "fortunes.txt"], "promote": ["v0000"]}.get(command, [])
    before = sorted(p.name for p in (ws / "checkpoints").iterdir())
    run = _incr(command, ws, *args)
    assert run.returncode == 2, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {ws}") and "cannot be written (read-only file system)" in line
    assert f"'{command}' writes into the workspace" in line and "unexpected" not in run.stderr
    assert sorted(p.name for p in (ws / "checkpoints").iterdir()) == before
    assert Workspace.open(ws).latest() == "v0001"


def test_eval_scores_a_read_only_workspace_and_says_it_kept_nothing(read_only_line, tmp_path):
    ws, _ = read_only_line
    run = _incr("eval", ws, "--out", tmp_path / "scores.json")
    assert run.returncode == 0, run.stderr
    assert "is read-only: the scores are printed, not cached or saved under eval/" in run.stderr
    assert "d0001-austen" in run.stdout + run.stderr and (tmp_path / "scores.json").is_file()


def test_permission_denied_on_the_lock_file_is_the_same_refusal(tiny_workspace, monkeypatch):
    """Root can write anywhere, so another user's workspace is simulated here: os.open says EACCES."""
    real_open = lock_mod.os.open

    def denied(path, *args, **kwargs):
        if str(path).endswith(".incr.lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(lock_mod.os, "open", denied)
    with pytest.raises(UsageError, match=r"\.incr\.lock: cannot be written \(permission denied\); 'ingest'"):
        with tiny_workspace.lock("ingest"):
            pass
