"""Helpers for the reliability tests: `incr` in a real process (kill -9 and signals need one), the
same command in-process (fast reruns), and the check that a workspace holds only complete versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.store.workspace import Workspace
from tests.helpers_train import REPO, assert_same_weights, reset_faults, template, weights

INCR = [sys.executable, "-m", "incr_cli"]
_runner = CliRunner()


def _env(fault: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "INCR_FAULT"}
    if fault:
        env["INCR_FAULT"] = fault
    return env


def incr_process(*args: object, fault: str | None = None) -> subprocess.Popen:
    """``python -m incr_cli ARGS`` started in the background (INCR_FAULT=fault when given)."""
    return subprocess.Popen([*INCR, *map(str, args)], cwd=REPO, env=_env(fault), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_incr(*args: object, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m incr_cli ARGS`` to the end; returncode -9 when the fault killed it."""
    return subprocess.run([*INCR, *map(str, args)], cwd=REPO, env=_env(fault), text=True, capture_output=True,
                          timeout=timeout)


def cli(*args: object):
    """The same command in this process (typer's runner): exit_code, stdout, stderr, output."""
    reset_faults()
    return _runner.invoke(app, [str(a) for a in args])


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll ``condition`` every 2 ms while ``proc`` runs; fail if it ends or the time is up first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) first: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the process")
        time.sleep(0.002)


def lock_holder_pid(ws: Workspace) -> int | None:
    """The PID recorded in .incr.lock (the record stays after its holder died)."""
    try:
        return int(json.loads((ws.root / ".incr.lock").read_text() or "{}")["pid"])
    except (OSError, ValueError, KeyError):
        return None


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    """A user-facing failure: exactly one ``error:`` line holding every fragment, no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_only_complete_versions(ws: Workspace) -> dict:
    """`incr status --json` lists only readable, sealed versions, LATEST is one of them (base or
    promoted, or promoted by hand), `current` points at it, and `incr verify --all` accepts every version and increment. -> the status report."""
    status = cli("status", ws.root, "--json")
    assert status.exit_code == 0, status.output
    report = json.loads(status.stdout)
    by_name = {v["version"]: v for v in report["versions"]}
    for v in report["versions"]:
        assert v["problem"] is None and v["status"] in ("base", "promoted", "rejected"), v
    latest = by_name[report["latest"]]
    assert latest["status"] in ("base", "promoted") or latest["promoted_by_hand"], latest
    assert report["current"] == report["latest"]  # the serving link follows LATEST
    verify = cli("verify", ws.root, "--all", "--json")
    assert verify.exit_code == 0, verify.output
    assert {c["id"] for c in json.loads(verify.stdout)["checked"]} >= set(by_name)
    return report


def leftovers(ws: Workspace) -> list[Path]:
    """Temporary folders and resumable state left in staging/."""
    return [*ws.staging.glob("tmp-*"), *ws.staging.glob("resume/*/*")]


# ----------------------------------------------------------------------------- one run, interrupted or not

# v0001 trained on d0001-austen, d0002-fortunes pending: replay + distillation, state saved at steps 2
# and 4. One thread: the same numbers in every process, and no OpenMP spinning on a busy CI machine.
# Neither eval.* nor runtime.num_threads nor runtime.save_every is part of the run key (they do not
# change the weights).
FAST = ["eval.max_sequences=8", "runtime.num_threads=1"]
ARGS = ["train.steps=6", "runtime.save_every=2", *FAST]
# Long enough that a signal sent once the first state is saved lands inside the loop.
LONG = ["train.steps=40", "runtime.save_every=2", *FAST]
_REFERENCES: dict[tuple[str, ...], dict] = {}


def uninterrupted(tmp_path_factory, args: list[str]) -> dict:
    """v0002 of one uninterrupted in-process run of ``args`` on the two_increments template: its
    tensors and run key (computed once per test session)."""
    if tuple(args) not in _REFERENCES:
        ref = Workspace(template(tmp_path_factory, "two_increments")).copy_to(tmp_path_factory.mktemp("ref") / "ws")
        result = cli("train-increment", ref.root, *args)
        assert result.exit_code == 0, result.output
        _REFERENCES[tuple(args)] = {"weights": weights(ref, "v0002"), "run_key": ref.version_manifest("v0002")["run_key"]}
    return _REFERENCES[tuple(args)]


def rerun_equals(ws: Workspace, reference: dict, args: list[str] = ARGS, *, resumed_from: int | None):
    """Run the same command again: it completes, resumes where said, and writes the reference's v0002."""
    result = cli("train-increment", ws.root, *args, "--json")
    assert result.exit_code == 0, result.output
    if resumed_from is not None:
        assert f"resuming from step {resumed_from} of " in result.stderr, result.stderr
    else:
        assert "resuming" not in result.stderr
    assert json.loads(result.stdout)["resumed_from_step"] == resumed_from
    assert ws.versions() == ["v0000", "v0001", "v0002"] and ws.latest() == "v0002"
    assert_same_weights(weights(ws, "v0002"), reference["weights"])
    assert ws.version_manifest("v0002")["run_key"] == reference["run_key"]
    assert not leftovers(ws)
    assert_only_complete_versions(ws)
    return result


# ----------------------------------------------------------------------------- a real small filesystem


PAGE = 4096


class SmallDisk:
    """A tmpfs mounted by the test (a real filesystem that really fills up), with a filler file that
    leaves an exact number of bytes free and is removed when "space is back"."""

    def __init__(self, root: Path):
        self.root = root
        self.filler = root / ".filler"

    def free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def leave(self, free_bytes: int) -> None:
        """Fill the disk so that only ``free_bytes`` (rounded down to a page) stay free."""
        self.release()
        size = self.free() - free_bytes // PAGE * PAGE
        assert size > 0, f"the disk has only {self.free()} bytes free, fewer than {free_bytes}"
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Space is back."""
        self.filler.unlink(missing_ok=True)


def mount_small_disk(folder: Path, size_mb: int):
    """A tmpfs of ``size_mb`` MiB at ``folder`` -> (SmallDisk, unmount); pytest.skip where the
    machine does not allow it (not root, no mount)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("a real small filesystem needs root to mount a tmpfs (a plain user's run mounts it in a "
                    "namespace of its own: test_mounts_without_root.py)")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    return SmallDisk(folder), lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def page_bytes(*paths: Path) -> int:
    """What ``paths`` occupy on a tmpfs: whole pages."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in paths)


def mount_read_only(source: Path, target: Path):
    """``source`` seen read-only at ``target`` (a bind mount remounted ro: a real read-only
    filesystem) -> unmount; pytest.skip where the machine does not allow it (not root, no mount)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (a plain user's run mounts it in a namespace of its "
                    "own: test_mounts_without_root.py)")
    target.mkdir(parents=True, exist_ok=True)
    for args in (["mount", "--bind", str(source), str(target)], ["mount", "-o", "remount,bind,ro", str(target)]):
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
            pytest.skip(f"cannot mount read-only here: {done.stderr.strip() or done.returncode}")
    return lambda: subprocess.run(["umount", "-l", str(target)], capture_output=True)
