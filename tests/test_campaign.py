"""A kill -9 campaign: real SIGKILLs at random times (not at named fault points) during
train-increment and ingest, each followed by a rerun of the same command (which may be killed
again). After every kill: only complete versions and increments, `verify --all` clean. At the end:
the weights equal an uninterrupted run's bit for bit, the shards and index equal an uninterrupted
ingest's byte for byte.

The number of kills and the seed are printed (``pytest -s`` or the failure report) and can be set
to replay a failure: ``INCR_CAMPAIGN_KILLS=N INCR_CAMPAIGN_SEED=S``. A kill drawn after the run
already finished kills nothing; the run then simply completed (counted and printed).
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import time

import pytest

from incr_cli.workspace import Workspace
from tests.helpers_reliability import (
    LONG,
    assert_only_complete_versions,
    cli,
    incr_process,
    lock_holder_pid,
    wait_for,
)
from tests.helpers_train import assert_same_weights, copy_workspace, excerpt, template, weights

KILLS = int(os.environ.get("INCR_CAMPAIGN_KILLS", "3"))  # per command: train-increment, then ingest
SEED = int(os.environ.get("INCR_CAMPAIGN_SEED") or random.SystemRandom().randrange(1 << 31))
REPLAY = f"INCR_CAMPAIGN_KILLS={KILLS} INCR_CAMPAIGN_SEED={SEED}"


def kill_at_random(args: list, ws: Workspace, rng: random.Random, within: float) -> str:
    """Start ``incr ARGS``; once it holds the lock (past start-up), SIGKILL it after a random delay
    in [0, within) seconds. -> "killed" or "finished" (the delay outlived the run)."""
    proc = incr_process(*args)
    wait_for(lambda: lock_holder_pid(ws) == proc.pid, proc)
    try:
        proc.wait(timeout=rng.uniform(0, within))
    except subprocess.TimeoutExpired:
        proc.kill()
    proc.communicate()
    if proc.returncode == -9:
        return "killed"
    assert proc.returncode == 0, f"{REPLAY}: exit {proc.returncode}"
    return "finished"


def timed(fn) -> tuple[object, float]:
    started = time.monotonic()
    return fn(), time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_kill_9_during_train_increment(tmp_path, tmp_path_factory):
    print(f"campaign: {REPLAY}")
    rng = random.Random(SEED)
    ref = copy_workspace(template(tmp_path_factory, "two_increments"), tmp_path / "ref")
    result, seconds = timed(lambda: cli("train-increment", ref.root, *LONG))
    assert result.exit_code == 0, result.output
    ws = copy_workspace(template(tmp_path_factory, "two_increments"), tmp_path / "ws")
    outcomes = []
    for _ in range(KILLS):
        outcomes.append(kill_at_random(["train-increment", ws.root, *LONG], ws, rng, within=1.5 * seconds))
        report = assert_only_complete_versions(ws)
        assert ws.versions() in (["v0000", "v0001"], ["v0000", "v0001", "v0002"]), REPLAY
        assert report["latest"] in ("v0001", "v0002"), REPLAY
    print(f"campaign: train-increment {outcomes}")
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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_kill_9_during_ingest(tmp_path, tmp_path_factory):
    print(f"campaign: {REPLAY}")
    rng = random.Random(SEED + 1)
    text = excerpt("pydocs.txt", slice(0, 3000), tmp_path)
    ref = copy_workspace(template(tmp_path_factory, "two_increments"), tmp_path / "ref")
    result, seconds = timed(lambda: cli("ingest", ref.root, text, "--name", "pydocs"))
    assert result.exit_code == 0, result.output
    ws = copy_workspace(template(tmp_path_factory, "two_increments"), tmp_path / "ws")
    outcomes = []
    for _ in range(KILLS):
        outcomes.append(kill_at_random(["ingest", ws.root, text, "--name", "pydocs"], ws, rng, within=1.5 * seconds))
        assert ws.increments() in (["d0001-austen", "d0002-fortunes"],
                                   ["d0001-austen", "d0002-fortunes", "d0003-pydocs"]), REPLAY
        assert_only_complete_versions(ws)  # verify --all: every increment whole and checksummed
    print(f"campaign: ingest {outcomes}")
    final = cli("ingest", ws.root, text, "--name", "pydocs")
    assert final.exit_code == 0, f"{REPLAY}: {final.output}"
    assert ws.increments() == ["d0001-austen", "d0002-fortunes", "d0003-pydocs"], REPLAY
    assert _increment_bytes(ws, "d0003-pydocs") == _increment_bytes(ref, "d0003-pydocs"), REPLAY
    assert _index(ws) == _index(ref), REPLAY
    assert not list(ws.staging.glob("tmp-*")), REPLAY
