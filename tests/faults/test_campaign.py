"""A kill -9 campaign: real SIGKILLs at random times (not at named fault points) during
train-increment and ingest, each followed by a rerun of the same command (which may be killed
again). After every kill: only complete versions and increments, `verify --all` clean. At the end:
the weights equal an uninterrupted run's bit for bit, the shards and index equal an uninterrupted
ingest's byte for byte.

Each campaign claims phases and asserts that at least one kill landed in each, read from what the
killed run left on disk:
- train-increment: ``before a checkpoint`` (this run had not yet saved resumable state: the rerun
  starts from the same point) and ``after a checkpoint`` (it had: the rerun resumes from later on);
- ingest: ``start-up`` (lock held, no staging folder yet), ``staging`` (the increment half written
  under staging/: documents spooled or shards packed) and ``sealed`` (renamed into place and indexed,
  killed before the process exited).
A delay that outlives the run kills nothing; the run is then counted as ``finished``. After that, or
after a kill once the result was sealed, the workspace is reset to its start (a rerun would have
nothing left to do) and the delay redrawn; once a later phase has been seen, a missing earlier one
is sought between the delays that bracket it. The campaign ends once it has KILLS kills and every phase,
or fails after MAX_RUNS runs, printing what it saw.

The seed is pinned (20261204) and printed; replay or vary a campaign with
``INCR_CAMPAIGN_KILLS=N INCR_CAMPAIGN_SEED=S``.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from incr_cli.store.workspace import RESUME_POINTER, Workspace
from tests.helpers_reliability import (
    LONG,
    assert_only_complete_versions,
    cli,
    incr_process,
    lock_holder_pid,
    wait_for,
)
from tests.helpers_train import assert_same_weights, excerpt, weights

KILLS = int(os.environ.get("INCR_CAMPAIGN_KILLS", "3"))  # per command: train-increment, then ingest
SEED = int(os.environ.get("INCR_CAMPAIGN_SEED") or 20261204)
MAX_RUNS = 6 * KILLS + 12
REPLAY = f"INCR_CAMPAIGN_KILLS={KILLS} INCR_CAMPAIGN_SEED={SEED}"
TRAIN_PHASES = ("before a checkpoint", "after a checkpoint")
INGEST_PHASES = ("start-up", "staging", "sealed")


def run_seconds(args: list, ws: Workspace) -> float:
    """Seconds an uninterrupted ``incr ARGS`` runs from taking the lock to its exit (the kill window)."""
    proc = incr_process(*args)
    wait_for(lambda: lock_holder_pid(ws) == proc.pid, proc)
    started = time.monotonic()
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return time.monotonic() - started


def kill_after(args: list, ws: Workspace, delay: float) -> bool:
    """Start ``incr ARGS``; once it holds the lock (past start-up), SIGKILL it after ``delay`` seconds.
    -> True when the kill landed, False when the run finished first."""
    proc = incr_process(*args)
    wait_for(lambda: lock_holder_pid(ws) == proc.pid, proc)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
    _, err = proc.communicate()
    if proc.returncode == -9:
        return True
    assert proc.returncode == 0, f"{REPLAY}: exit {proc.returncode}: {err}"
    return False


def draw_delay(rng: random.Random, within: float, seen: list[tuple[float, str]], order: tuple[str, ...]) -> float:
    """A random delay in [0, within); once some phase of ``order`` (earliest first) has been seen and
    an earlier one is still missing, drawn between the delays that bracket the missing one."""
    missing = [p for p in order if p not in {phase for _, phase in seen}]
    if not seen or not missing:
        return rng.uniform(0, within)
    rank = order.index(missing[0])
    lo = max((d for d, p in seen if order.index(p) < rank), default=0.0)
    hi = min((d for d, p in seen if order.index(p) > rank), default=within)
    return rng.uniform(lo, max(hi, lo))


def campaign(args: list, fresh: Callable[[], Workspace], phase_of: Callable[[Workspace, object], str],
             before: Callable[[Workspace], object], phases: tuple[str, ...], rng: random.Random,
             within: float, check: Callable[[Workspace], None]) -> tuple[Workspace, list[str]]:
    """Kill ``incr ARGS`` at random until KILLS kills landed and every phase in ``phases`` was hit;
    ``check`` the workspace after each kill. -> the workspace of the last chain, and every outcome."""
    order = tuple(dict.fromkeys((*phases, "sealed", "finished")))
    ws, seen = fresh(), []
    outcomes: list[str] = []
    while sum(o != "finished" for o in outcomes) < KILLS or not set(phases) <= set(outcomes):
        assert len(outcomes) < MAX_RUNS, f"{REPLAY}: no kill in some phase of {phases} after {outcomes}"
        state, delay = before(ws), draw_delay(rng, within, seen, order)
        outcomes.append(phase_of(ws, state) if kill_after(args, ws, delay) else "finished")
        seen.append((delay, outcomes[-1]))
        if outcomes[-1] != "finished":
            check(ws)
        if outcomes[-1] in ("finished", "sealed"):
            ws = fresh()
    print(f"campaign: {args[0]} {outcomes}")
    return ws, outcomes


def checkpoint_step(ws: Workspace) -> int:
    """Steps of the newest resumable state in the workspace (0 when there is none)."""
    names = [p.read_text(encoding="utf-8").strip() for p in ws.resume_dir.glob(f"*/{RESUME_POINTER}")]
    return max((int(n.removeprefix("state-")) for n in names if n.startswith("state-")), default=0)


def train_phase(ws: Workspace, step_before: object) -> str:
    if "v0002" in ws.versions():
        return "sealed"
    return "after a checkpoint" if checkpoint_step(ws) > step_before else "before a checkpoint"


def staged(ws: Workspace) -> set[Path]:
    return set(ws.staging.glob("tmp-d0003-*"))


def ingest_phase(ws: Workspace, staged_before: object) -> str:
    """What the killed ingest was doing: its increment in place, or a new staging folder (one left by
    an earlier kill does not count), or neither."""
    if ws.increment_dir("d0003-pydocs").is_dir():
        return "sealed"
    return "staging" if staged(ws) - staged_before else "start-up"


def _train_check(ws: Workspace) -> None:
    report = assert_only_complete_versions(ws)
    assert ws.versions() in (["v0000", "v0001"], ["v0000", "v0001", "v0002"]), REPLAY
    assert report["latest"] in ("v0001", "v0002"), REPLAY


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_random_kill_9_during_train_increment(tmp_path, workspace_copy):
    print(f"campaign: {REPLAY}")
    rng = random.Random(SEED)
    args = ["train-increment", tmp_path / "ws", *LONG]
    ref = workspace_copy("two_increments", tmp_path / "ref")
    seconds = run_seconds(["train-increment", ref.root, *LONG], ref)

    def fresh() -> Workspace:
        shutil.rmtree(tmp_path / "ws", ignore_errors=True)
        return workspace_copy("two_increments", tmp_path / "ws")

    ws, outcomes = campaign(args, fresh, train_phase, checkpoint_step, TRAIN_PHASES, rng, seconds, _train_check)
    assert {*TRAIN_PHASES} <= {*outcomes} and sum(o != "finished" for o in outcomes) >= KILLS, (REPLAY, outcomes)
    final = cli("train-increment", ws.root, *LONG)
    assert final.exit_code == 0, f"{REPLAY}: {final.output}"
    assert ws.versions() == ["v0000", "v0001", "v0002"] and ws.latest() == "v0002", REPLAY
    assert_same_weights(weights(ws, "v0002"), weights(ref, "v0002"))
    assert not list(ws.staging.glob("tmp-*")) and not list(ws.staging.glob("resume/*")), REPLAY
    assert_only_complete_versions(ws)


def _increment_bytes(ws: Workspace, inc: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in ws.increment_dir(inc).iterdir() if p.name != "manifest.json"}


def _index(ws: Workspace) -> list:
    with sqlite3.connect(ws.index_path) as conn:
        return sorted(conn.execute("SELECT hex(hash), increment FROM documents").fetchall())


def _ingest_check(ws: Workspace) -> None:
    assert ws.increments() in (["d0001-austen", "d0002-fortunes"],
                               ["d0001-austen", "d0002-fortunes", "d0003-pydocs"]), REPLAY
    assert_only_complete_versions(ws)  # verify --all: every increment whole and checksummed


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_random_kill_9_during_ingest(tmp_path, workspace_copy):
    print(f"campaign: {REPLAY}")
    rng = random.Random(SEED + 1)
    text = excerpt("pydocs.txt", slice(0, 3000), tmp_path)
    ref = workspace_copy("two_increments", tmp_path / "ref")
    seconds = run_seconds(["ingest", ref.root, text, "--name", "pydocs"], ref)
    args = ["ingest", tmp_path / "ws", text, "--name", "pydocs"]

    def fresh() -> Workspace:
        shutil.rmtree(tmp_path / "ws", ignore_errors=True)
        return workspace_copy("two_increments", tmp_path / "ws")

    ws, outcomes = campaign(args, fresh, ingest_phase, staged, INGEST_PHASES, rng, seconds, _ingest_check)
    assert {*INGEST_PHASES} <= {*outcomes} and sum(o != "finished" for o in outcomes) >= KILLS, (REPLAY, outcomes)
    final = cli("ingest", ws.root, text, "--name", "pydocs")
    assert final.exit_code == 0, f"{REPLAY}: {final.output}"
    assert ws.increments() == ["d0001-austen", "d0002-fortunes", "d0003-pydocs"], REPLAY
    assert _increment_bytes(ws, "d0003-pydocs") == _increment_bytes(ref, "d0003-pydocs"), REPLAY
    assert _index(ws) == _index(ref), REPLAY
    assert not list(ws.staging.glob("tmp-*")), REPLAY
