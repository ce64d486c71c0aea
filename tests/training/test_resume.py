"""Resumable state: saved atomically, and an interrupted run resumed ends in the same version."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.config.recipe import load_recipe
from incr_cli.errors import DiskFull
from incr_cli.methods import plan_increment
from incr_cli.store.workspace import Workspace
from incr_cli.training.checkpointing import ResumeStore, capture_rng, restore_rng
from incr_cli.training.plan import run_key
from tests.helpers_train import REPO, assert_same_weights, reset_faults, weights

runner = CliRunner()
ARGS = ["train.steps=6", "runtime.save_every=2"]  # replay + distillation (the workspace recipe's default)


def cli(ws: Workspace, *args: str):
    reset_faults()
    return runner.invoke(app, ["train-increment", str(ws.root), *ARGS, *args])


@pytest.fixture
def ws(two_increments) -> Workspace:
    return two_increments


_REFERENCE: dict[str, dict[str, torch.Tensor]] = {}


@pytest.fixture
def uninterrupted(tmp_path_factory, workspace_copy) -> dict[str, torch.Tensor]:
    """v0002's weights from an uninterrupted run of ARGS (computed once)."""
    if "v0002" not in _REFERENCE:
        ref = workspace_copy("two_increments", tmp_path_factory.mktemp("ref") / "ws")
        result = cli(ref)
        assert result.exit_code == 0, result.output
        _REFERENCE["v0002"] = weights(ref, "v0002")
    return _REFERENCE["v0002"]


# ----------------------------------------------------------------------------- the store


def test_state_round_trip_restores_weights_optimizer_and_rngs(tmp_path):
    ws = Workspace(tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    store = ResumeStore(ws, "k")
    store.save(5, model, {"optimizer": optimizer.state_dict(), "step": 5}, capture_rng(torch.device("cpu")), {})
    expected = (random.random(), np.random.rand(), torch.rand(1))

    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    trainer, rng = store.load(other, torch.device("cpu"))
    restore_rng(rng, torch.device("cpu"))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert_same_weights(model.state_dict(), other.state_dict())
    restored = torch.optim.AdamW(other.parameters(), lr=0.1)
    restored.load_state_dict(trainer["optimizer"])
    assert trainer["step"] == 5
    torch.testing.assert_close(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_a_save_killed_midway_leaves_the_previous_state(tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    model = torch.nn.Linear(3, 3)
    store = ResumeStore(ws, "k")
    store.save(2, model, {"step": 2}, capture_rng(torch.device("cpu")), {})
    reset_faults()
    monkeypatch.setenv("INCR_FAULT", "train.state_save:raise")  # ENOSPC: a full disk, named as one
    with pytest.raises(DiskFull, match="no space left on device: resumable state"):
        store.save(4, model, {"step": 4}, capture_rng(torch.device("cpu")), {})
    assert store.current().name == "state-00000002"
    assert store.load(torch.nn.Linear(3, 3), torch.device("cpu"))[0]["step"] == 2
    monkeypatch.delenv("INCR_FAULT")
    store.save(4, model, {"step": 4}, capture_rng(torch.device("cpu")), {})  # the torn folder is replaced
    assert [p.name for p in store.root.iterdir()] == ["CURRENT", "state-00000004"] or \
        sorted(p.name for p in store.root.iterdir()) == ["CURRENT", "state-00000004"]
    store.clear()
    assert store.load(model, torch.device("cpu")) is None


def test_run_key_follows_what_changes_the_weights(ws):
    def key(*overrides: str) -> str:
        recipe = load_recipe(ws.recipe_path, list(overrides))
        return run_key(plan_increment(ws, recipe), recipe, "sha")

    base = key()
    assert key("gate.max_forgetting=0.1", "eval.max_sequences=8", "train.log_every=3", "runtime.save_every=1",
               "data.batch_docs=7") == base
    assert key("train.lr=1e-4") != base and key("replay.ratio=0.5") != base and key("train.steps=7") != base


# ----------------------------------------------------------------------------- interrupted runs


def test_killed_run_resumes_to_the_same_version(ws, uninterrupted):
    """kill -9 after step 3 (state saved at step 2) in a real process; the rerun resumes and matches."""
    env = {**os.environ, "INCR_FAULT": "train.step@3:kill"}
    killed = subprocess.run([sys.executable, "-m", "incr_cli", "train-increment", str(ws.root), *ARGS],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert ws.versions() == ["v0000", "v0001"] and ws.latest() == "v0001"
    result = cli(ws, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from_step"] == 2
    assert_same_weights(weights(ws, "v0002"), uninterrupted)
    assert ws.latest() == "v0002" and not any((ws.staging / "resume").iterdir())


@pytest.mark.parametrize("signal_action, code", [("term", 143), ("int", 130)])
def test_signal_saves_state_and_exits_promptly(ws, uninterrupted, monkeypatch, signal_action, code):
    monkeypatch.setenv("INCR_FAULT", f"train.step@3:{signal_action}")
    result = cli(ws)
    assert result.exit_code == code, result.output
    assert "after step 3 of 6" in result.output and "resume" in result.output
    assert ws.versions() == ["v0000", "v0001"]
    monkeypatch.delenv("INCR_FAULT")
    result = cli(ws, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from_step"] == 3
    assert_same_weights(weights(ws, "v0002"), uninterrupted)


def test_failure_while_writing_the_version_resumes_at_the_end(ws, uninterrupted, monkeypatch):
    monkeypatch.setenv("INCR_FAULT", "save_version.sealing:raise")
    assert cli(ws).exit_code == 1
    assert ws.versions() == ["v0000", "v0001"] and not list(ws.staging.glob("tmp-*"))
    monkeypatch.delenv("INCR_FAULT")
    result = cli(ws, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from_step"] == 4  # the last periodic save
    assert_same_weights(weights(ws, "v0002"), uninterrupted)


def test_failure_before_latest_moves_is_finished_by_the_rerun(ws, uninterrupted, monkeypatch):
    monkeypatch.setenv("INCR_FAULT", "train.latest_update:raise")
    assert cli(ws).exit_code == 1
    assert ws.versions() == ["v0000", "v0001", "v0002"] and ws.latest() == "v0001"
    monkeypatch.delenv("INCR_FAULT")
    result = cli(ws)
    assert result.exit_code == 0, result.output
    assert "already trained" in result.output
    assert ws.versions() == ["v0000", "v0001", "v0002"] and ws.latest() == "v0002"
    assert_same_weights(weights(ws, "v0002"), uninterrupted)


def test_a_changed_command_leaves_the_old_state_then_removes_it_with_its_version(ws, monkeypatch):
    """State left by an interrupted run is listed by status; a run with another recipe from the same
    parent says it starts afresh, and once it writes its version the stale state is gone."""
    monkeypatch.setenv("INCR_FAULT", "train.step@3:term")
    assert cli(ws).exit_code == 143
    monkeypatch.delenv("INCR_FAULT")
    (left,) = ws.resume_states()
    assert (left["parent"], left["step"], left["steps"]) == ("v0001", 3, 6) and left["bytes"] > 0

    status = runner.invoke(app, ["status", str(ws.root), "--json"])
    assert json.loads(status.stdout)["resume_states"][0]["key"] == left["key"]
    plain = runner.invoke(app, ["status", str(ws.root)])
    assert "step 3 of 6" in plain.output and left["key"] in plain.output

    result = cli(ws, "train.lr=1e-4")  # another key: must not resume the old state
    assert result.exit_code == 0, result.output
    assert "starts afresh" in result.output and "resuming" not in result.output
    assert ws.latest() == "v0002" and ws.resume_states() == []


def test_stop_signal_restores_its_handlers_but_leaves_one_set_inside_it():
    """SIGTERM/SIGINT are caught inside the loop and given back after it, unless something inside
    changed them on purpose: a torchrun rank that lost a peer ignores SIGTERM while it reports."""
    import signal

    from incr_cli.runtime.distributed import _ignore_sigterm
    from incr_cli.training.checkpointing import StopSignal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with StopSignal() as stop:
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert {sig: signal.getsignal(sig) for sig in before} == before
        with StopSignal():
            _ignore_sigterm()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler or signal.SIG_DFL)
