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
from incr_cli.workspace import Workspace
from tests.helpers_train import REPO, reset_faults

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
    promoted), and `incr verify --all` accepts every version and increment. -> the status report."""
    status = cli("status", ws.root, "--json")
    assert status.exit_code == 0, status.output
    report = json.loads(status.stdout)
    by_name = {v["version"]: v for v in report["versions"]}
    for v in report["versions"]:
        assert v["problem"] is None and v["status"] in ("base", "promoted", "rejected"), v
    assert by_name[report["latest"]]["status"] in ("base", "promoted")
    verify = cli("verify", ws.root, "--all", "--json")
    assert verify.exit_code == 0, verify.output
    assert {c["id"] for c in json.loads(verify.stdout)["checked"]} >= set(by_name)
    return report


def leftovers(ws: Workspace) -> list[Path]:
    """Temporary folders and resumable state left in staging/."""
    return [*ws.staging.glob("tmp-*"), *ws.staging.glob("resume/*/*")]
