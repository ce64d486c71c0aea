"""The mount tests without root. A full tmpfs (``test_disk_full.py``) and a read-only bind mount
(``test_read_only.py``) need the right to mount; root has it, and where the kernel lets an
unprivileged user own a user and a mount namespace (``unshare --map-root-user --mount``), so does that
user, as root of its own namespace only. There this test runs both files in such a namespace, so a
plain user's ``make test`` runs them too instead of skipping them. As root they run directly."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_train import REPO

MOUNT_TESTS = ["tests/faults/test_disk_full.py", "tests/faults/test_read_only.py"]
NAMESPACE = ["unshare", "--map-root-user", "--mount"]


def namespace_refused(folder: Path) -> str | None:
    """Why this user cannot mount (a tmpfs at ``folder``) in a namespace of its own, or None where it can."""
    if shutil.which("unshare") is None:
        return "no unshare command (util-linux)"
    folder.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run([*NAMESPACE, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                           capture_output=True, text=True, timeout=60)
    return None if probe.returncode == 0 else (probe.stderr.strip() or f"exit {probe.returncode}")


def run_counts(output: str) -> dict[str, int]:
    """pytest's last line ("19 passed, 2 skipped in 3.1s") -> {"passed": 19, "skipped": 2}."""
    last = output.strip().splitlines()[-1] if output.strip() else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}



@pytest.mark.skipif(os.geteuid() == 0, reason="root runs the mount tests directly")
def test_the_mount_tests_run_for_a_user_without_root(tmp_path):
    refused = namespace_refused(tmp_path / "probe")
    if refused:
        pytest.skip(f"this kernel gives no unprivileged mount namespace ({refused}): the mount tests need root here")
    done = subprocess.run([*NAMESPACE, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"--basetemp={tmp_path / 'inside'}", *MOUNT_TESTS],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    output = done.stdout + done.stderr
    counts = run_counts(done.stdout)
    assert done.returncode == 0, output[-4000:]
    # every one ran: a mount refused inside the namespace skips its test, it does not fail it
    assert counts.get("passed", 0) > 0 and not counts.get("skipped"), output[-4000:]


def test_the_summary_is_read_from_pytests_last_line():
    assert run_counts("....\n19 passed in 31.97s\n") == {"passed": 19}
    assert run_counts("x\n12 passed, 7 skipped in 3s") == {"passed": 12, "skipped": 7}
    assert run_counts("1 failed, 2 errors in 1s") == {"failed": 1, "errors": 2}
