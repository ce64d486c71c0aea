"""train-increment under faults, in real processes: kill -9 at every stage, SIGTERM/SIGINT, a second
writer, a failing disk, a non-finite loss. After each: only complete versions, LATEST verified, and
the same command run again ends in the version an uninterrupted run writes (equal tensors)."""

from __future__ import annotations

import os
import re
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from incr_cli.store.workspace import Workspace
from incr_cli.training.checkpointing import ResumeStore
from tests.helpers_reliability import (
    ARGS,
    LONG,
    assert_one_error_line,
    assert_only_complete_versions,
    cli,
    incr_process,
    leftovers,
    lock_holder_pid,
    rerun_equals,
    run_incr,
    uninterrupted,
    wait_for,
)
from tests.helpers_train import SAMPLES, assert_same_weights, weights


@pytest.fixture
def ws(tmp_path, workspace_copy) -> Workspace:
    return workspace_copy("two_increments", tmp_path / "ws")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """v0002 of one uninterrupted run of ARGS: its tensors and run key."""
    return uninterrupted(tmp_path_factory, ARGS)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory) -> dict:
    return uninterrupted(tmp_path_factory, LONG)


# ----------------------------------------------------------------------------- kill -9


KILLS = [
    # fault point, the step the rerun resumes from (None: from the start)
    ("train.step@1:kill", None),  # early: before the first state save
    ("train.step@4:kill", 2),  # mid-run: the state of step 2 survives
    ("train.state_save@1:kill", None),  # first save torn before its pointer moved: nothing to resume
    ("train.state_save@2:kill", 2),  # second save torn: the first one is still current
    ("train.version_write:kill", 4),  # trained and evaluated, nothing written yet
    ("save_version.sealing:kill", 4),  # the version's folder half-written under staging/
]


LATEST_UPDATE = "train.latest_update:kill"  # after v0002 was renamed into place, before LATEST moved


@pytest.fixture(scope="module")
def killed(tmp_path_factory, workspace_copy):
    """The kill -9 runs of this module, started up front two at a time (each is mostly one core
    importing torch) while the tests rerun the ones already done: fault -> (workspace, future)."""
    pool = ThreadPoolExecutor(max_workers=2)
    runs = {}
    for fault in [*(k[0] for k in KILLS), LATEST_UPDATE]:
        ws = workspace_copy("two_increments", tmp_path_factory.mktemp("killed") / "ws")
        runs[fault] = (ws, pool.submit(run_incr, "train-increment", ws.root, *ARGS, fault=fault))
    yield runs
    pool.shutdown(cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("fault, resumed_from", KILLS, ids=[k[0].split(":")[0] for k in KILLS])
def test_kill_9_then_rerun_equals_uninterrupted(killed, reference, fault, resumed_from):
    ws, run = killed[fault]
    proc = run.result()
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    report = assert_only_complete_versions(ws)
    assert report["latest"] == "v0001" and ws.versions() == ["v0000", "v0001"]
    if fault.startswith("save_version"):
        assert report["staging_leftovers"]  # the torn folder is in staging/, never among the versions
    rerun_equals(ws, reference, resumed_from=resumed_from)


@pytest.mark.slow
def test_kill_9_before_latest_moves_promotes_without_a_duplicate(killed, reference):
    """v0002 was renamed into place, LATEST still names v0001: the rerun recognises its own run
    (the run key in v0002's manifest) and only moves LATEST."""
    ws, run = killed[LATEST_UPDATE]
    proc = run.result()
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    report = assert_only_complete_versions(ws)
    assert report["latest"] == "v0001" and ws.versions() == ["v0000", "v0001", "v0002"]
    assert_same_weights(weights(ws, "v0002"), reference["weights"])
    sealed = {p.name: p.stat().st_mtime_ns for p in ws.version_dir("v0002").iterdir()}
    result = cli("train-increment", ws.root, *ARGS)
    assert result.exit_code == 0, result.output
    assert "stopped before LATEST moved; LATEST -> v0002" in result.output and "already trained" in result.output
    assert ws.versions() == ["v0000", "v0001", "v0002"] and ws.latest() == "v0002"
    assert {p.name: p.stat().st_mtime_ns for p in ws.version_dir("v0002").iterdir()} == sealed  # untouched
    again = cli("train-increment", ws.root, *ARGS)  # cron the next night: nothing left to do
    assert again.exit_code == 0 and "nothing to train" in again.output
    assert ws.versions() == ["v0000", "v0001", "v0002"] and not leftovers(ws)
    assert_only_complete_versions(ws)


def test_death_after_the_version_is_written_leaves_no_state_behind(ws, reference, monkeypatch):
    """Between renaming v0002 into place and removing the resumable state there is no fault point:
    a failure there (as a kill would) leaves both. The rerun promotes v0002 and removes the state."""
    def die(self):
        raise OSError(5, "Input/output error (simulated death after the version was written)")

    monkeypatch.setattr(ResumeStore, "clear", die)
    assert cli("train-increment", ws.root, *ARGS).exit_code == 1
    assert ws.versions() == ["v0000", "v0001", "v0002"] and ws.latest() == "v0001" and leftovers(ws)
    assert_only_complete_versions(ws)
    monkeypatch.undo()
    result = cli("train-increment", ws.root, *ARGS)
    assert result.exit_code == 0 and "LATEST -> v0002" in result.output, result.output
    assert ws.versions() == ["v0000", "v0001", "v0002"] and ws.latest() == "v0002"
    assert not leftovers(ws)  # a full model and optimizer state would otherwise stay forever


def test_damaged_resumable_state_is_named_and_removing_it_starts_afresh(ws, reference, monkeypatch):
    monkeypatch.setenv("INCR_FAULT", "train.step@3:term")
    assert cli("train-increment", ws.root, *ARGS).exit_code == 143
    monkeypatch.delenv("INCR_FAULT")
    (state,) = ws.staging.glob("resume/*/state-*")
    (state / "trainer.pt").write_bytes(b"torn")
    result = cli("train-increment", ws.root, *ARGS)
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, f"{state}: resumable state cannot be read", f"remove {state.parent}")
    assert ws.versions() == ["v0000", "v0001"]
    assert_only_complete_versions(ws)
    shutil.rmtree(state.parent)
    rerun_equals(ws, reference, resumed_from=None)


# ----------------------------------------------------------------------------- SIGTERM / SIGINT


def test_a_signal_at_a_step_saves_state_and_the_rerun_resumes(ws, reference):
    """SIGINT sent by the process to itself after step 3 (test_resume.py does both signals in-process)."""
    stopped = run_incr("train-increment", ws.root, *ARGS, fault="train.step@3:int")
    assert stopped.returncode == 130, stopped.stderr
    assert_one_error_line(stopped.stderr, "interrupted by SIGINT after step 3 of 6", "run the same command to resume")
    assert ws.versions() == ["v0000", "v0001"] and ws.latest() == "v0001"
    assert_only_complete_versions(ws)
    rerun_equals(ws, reference, resumed_from=3)


def checkpoint_step(ws) -> int:
    """Steps of the resumable state saved so far (its folder is named for them)."""
    return max(int(p.read_text().strip().removeprefix("state-")) for p in ws.staging.glob("resume/*/CURRENT"))


@pytest.mark.slow
def test_an_external_sigterm_mid_training_exits_143_promptly_and_the_rerun_resumes(ws, long_reference):
    proc = incr_process("train-increment", ws.root, *LONG)
    wait_for(lambda: any(ws.staging.glob("resume/*/CURRENT")), proc)  # inside the loop, past step 2
    saved = checkpoint_step(ws)
    proc.send_signal(signal.SIGTERM)  # what `kill PID`, systemd or a cron timeout sends
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    line = assert_one_error_line(stderr, "interrupted by SIGTERM after step ")
    step = int(re.search(r"after step (\d+) of 40", line).group(1))
    # promptly, counted in steps: at most the steps to the next save (2), a save racing the signal,
    # and the step under way finish; then one state save and exit
    assert saved <= step <= saved + 3 and ws.versions() == ["v0000", "v0001"], (saved, step)
    assert_only_complete_versions(ws)
    rerun_equals(ws, long_reference, LONG, resumed_from=step)


# ----------------------------------------------------------------------------- two writers


@pytest.mark.slow
def test_a_second_writer_exits_75_and_a_killed_holders_lock_is_taken_over(ws, reference):
    holder = incr_process("train-increment", ws.root, *ARGS)
    try:
        wait_for(lambda: lock_holder_pid(ws) == holder.pid, holder)
        os.kill(holder.pid, signal.SIGSTOP)  # still holding the flock, deterministically "still running"
        second = run_incr("train-increment", ws.root, *ARGS)
        assert second.returncode == 75
        assert_one_error_line(second.stderr, f"locked by PID {holder.pid}", "(train-increment")
        ingest = cli("ingest", ws.root, SAMPLES / "pydocs.txt")
        assert ingest.exit_code == 75 and f"PID {holder.pid}" in ingest.stderr
        assert ws.increments() == ["d0001-austen", "d0002-fortunes"]
    finally:
        holder.kill()  # kill -9 while it holds the lock
        holder.wait()
    assert lock_holder_pid(ws) == holder.pid  # its record stays; the kernel dropped its flock
    assert_only_complete_versions(ws)
    rerun_equals(ws, reference, resumed_from=resumed_from_state(ws))


def resumed_from_state(ws: Workspace) -> int | None:
    """The step of the state a killed run left (None when it left none)."""
    current = list(ws.staging.glob("resume/*/CURRENT"))
    return int(current[0].read_text().strip().split("-")[1]) if current else None


# ----------------------------------------------------------------------------- a failing disk, a non-finite loss


def test_a_failing_disk_write_leaves_no_partial_version_and_the_rerun_succeeds(ws, reference, monkeypatch):
    """ENOSPC while the version is written (test_resume.py fails it halfway through the staged folder)."""
    monkeypatch.setenv("INCR_FAULT", "train.version_write:raise")
    failed = cli("train-increment", ws.root, *ARGS)
    assert failed.exit_code == 1, failed.output
    assert_one_error_line(failed.stderr, "no space left on device", "free space and rerun")
    assert ws.versions() == ["v0000", "v0001"] and ws.latest() == "v0001"
    assert not list(ws.staging.glob("tmp-*"))
    assert_only_complete_versions(ws)
    monkeypatch.delenv("INCR_FAULT")
    rerun_equals(ws, reference, resumed_from=4)  # once space is back: from the last periodic save


def test_a_non_finite_loss_stops_the_run_names_the_step_and_promotes_nothing(ws, reference, monkeypatch):
    before = ws.latest_path.read_bytes()
    monkeypatch.setenv("INCR_FAULT", "train.loss@3:nan")
    failed = cli("train-increment", ws.root, *ARGS)
    assert failed.exit_code == 1, failed.output
    assert_one_error_line(failed.stderr, "non-finite loss (nan) at step 3", "nothing was promoted")
    assert ws.versions() == ["v0000", "v0001"] and ws.latest_path.read_bytes() == before
    assert_only_complete_versions(ws)
    monkeypatch.delenv("INCR_FAULT")
    # The step was never applied: a rerun (the fault was transient) resumes from the last good state.
    rerun_equals(ws, reference, resumed_from=2)


def test_reference_differs_from_its_parent(reference, ws):
    """The equality checks above are meaningful: training changed the weights."""
    parent = weights(ws, "v0001")
    assert any(not torch.equal(parent[n], reference["weights"][n]) for n in parent)
