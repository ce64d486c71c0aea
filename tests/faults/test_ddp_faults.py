"""One rank of a 2-process gloo torchrun run killed, hung, or the launcher stopped: the surviving
rank never waits forever (a broken connection or ``runtime.collective_timeout`` ends it with one
clear line), nothing is promoted, the resumable state stays usable, and the same command run again
ends with the weights of an uninterrupted torchrun run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from incr_cli.store.workspace import Workspace
from tests.helpers_reliability import assert_only_complete_versions, leftovers, wait_for
from tests.helpers_train import REPO, assert_same_weights, weights

# Long enough that a fault sent after the first periodic state lands inside the loop.
DDP_ARGS = ["train.steps=24", "runtime.save_every=2", "eval.max_sequences=8", "runtime.num_threads=1"]
BOUND = 180  # seconds any faulted run may take to end (the point: it ends; a generous bound, not a speed)
SURVIVOR_LINES = (  # what the surviving rank says when another died (docs/reliability.md's fault table)
    r"error: rank 0 of 2: the connection to another rank broke during .+; a rank died, hung or was stopped; "
    r"nothing was promoted: rerun the same command to resume from the last saved state",
    r"error: interrupted by SIGTERM after step \d+ of 24; state saved in .+: run the same command to resume",
)


def torchrun(ws: Workspace, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("INCR_FAULT", None)
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "incr_cli", "train-increment", str(ws.root), *DDP_ARGS, *extra],
        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = BOUND) -> tuple[int, str]:
    """-> (exit status, stdout and stderr): logs go to stdout, error lines to stderr."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        _, stderr = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout} s: {stderr[-3000:]}") from None
    return proc.returncode, stdout + stderr


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The worker process torchrun started for ``rank``."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "incr_cli" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker process of rank {rank}")


def in_the_loop(ws: Workspace, proc: subprocess.Popen) -> None:
    """Wait until the first periodic state is saved: both ranks are inside the training loop."""
    wait_for(lambda: any(ws.staging.glob("resume/*/CURRENT")), proc, timeout=BOUND)


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, workspace_copy) -> dict:
    """v0002 of one uninterrupted 2-rank run of DDP_ARGS."""
    ws = workspace_copy("two_increments", tmp_path_factory.mktemp("ddp-ref") / "ws")
    code, stderr = finish(torchrun(ws), timeout=600)
    assert code == 0, stderr[-3000:]
    return {"weights": weights(ws, "v0002"), "run_key": ws.version_manifest("v0002")["run_key"]}


@pytest.fixture
def ws(tmp_path, workspace_copy) -> Workspace:
    return workspace_copy("two_increments", tmp_path / "ws")


def nothing_promoted_state_kept(ws: Workspace) -> int:
    """No v0002, LATEST v0001, verify clean, a complete resumable state -> its step."""
    assert ws.versions() == ["v0000", "v0001"] and ws.latest() == "v0001"
    assert_only_complete_versions(ws)
    (current,) = ws.staging.glob("resume/*/CURRENT")
    state = current.parent / current.read_text().strip()
    assert {p.name for p in state.iterdir()} >= {"model.safetensors", "trainer.pt", "rng-0.pt", "rng-1.pt", "meta.json"}
    return int(state.name.removeprefix("state-"))


def rerun_equals_ddp(ws: Workspace, reference: dict, resumed_from: int) -> None:
    code, stderr = finish(torchrun(ws), timeout=600)
    assert code == 0, stderr[-3000:]
    assert f"resuming from step {resumed_from} of 24" in stderr, stderr[-3000:]
    assert ws.versions() == ["v0000", "v0001", "v0002"] and ws.latest() == "v0002"
    assert_same_weights(weights(ws, "v0002"), reference["weights"])
    assert ws.version_manifest("v0002")["run_key"] == reference["run_key"]
    assert not leftovers(ws)
    assert_only_complete_versions(ws)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_of_one_rank_ends_the_other_and_the_rerun_equals_uninterrupted(ws, ddp_reference):
    proc = torchrun(ws)
    in_the_loop(ws, proc)
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    killed = time.monotonic()
    code, stderr = finish(proc)
    print(f"killed rank 1; the run ended after {time.monotonic() - killed:.1f} s, exit {code}:\n{stderr[-2000:]}")
    assert code != 0 and time.monotonic() - killed < BOUND
    # rank 0 met the closed connection (or was stopped by torchrun first): either way exactly one
    # of README's two documented lines, whole, and no backend traceback from incr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and any(re.fullmatch(p, errors[0]) for p in SURVIVOR_LINES), stderr[-3000:]
    step = nothing_promoted_state_kept(ws)
    rerun_equals_ddp(ws, ddp_reference, resumed_from=step)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_hung_rank_times_the_other_out_with_a_clear_line(ws):
    """SIGSTOP: the rank is alive but never answers. Without the timeout rank 0 would wait 30 min."""
    proc = torchrun(ws, "runtime.collective_timeout=20")
    in_the_loop(ws, proc)
    hung = rank_pid(proc, 1)
    os.kill(hung, signal.SIGSTOP)
    stopped = time.monotonic()
    rank0 = psutil.Process(rank_pid(proc, 0))
    try:
        rank0.wait(timeout=BOUND)  # ends by itself: the collective timed out
    finally:
        os.kill(hung, signal.SIGCONT)  # let torchrun's SIGTERM reach it
    assert time.monotonic() - stopped >= 20 - 1
    code, stderr = finish(proc)
    print(f"hung rank 1; the run ended after {time.monotonic() - stopped:.1f} s, exit {code}:\n{stderr[-2000:]}")
    assert code != 0
    line = [x for x in stderr.splitlines() if x.startswith("error: rank 0 of 2: ")]
    assert line and "runtime.collective_timeout=20s" in line[0], stderr[-3000:]
    assert "nothing was promoted" in line[0] and "rerun the same command" in line[0]
    nothing_promoted_state_kept(ws)  # the rerun is the one of the killed rank above


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_to_the_launcher_saves_state_and_the_rerun_equals_uninterrupted(ws, ddp_reference):
    proc = torchrun(ws)
    in_the_loop(ws, proc)
    proc.send_signal(signal.SIGTERM)  # what a job scheduler sends to the launcher
    code, stderr = finish(proc)
    print(f"SIGTERM to torchrun; exit {code}:\n{stderr[-2000:]}")
    assert code != 0
    assert "error: interrupted by SIGTERM after step " in stderr, stderr[-3000:]
    step = nothing_promoted_state_kept(ws)
    rerun_equals_ddp(ws, ddp_reference, resumed_from=step)
