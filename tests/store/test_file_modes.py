"""Files a version or an export holds get the modes the user's umask gives, as ``open()`` would:
safetensors writes its files 0600, which left a version's weights unreadable to a server running as
another user."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from incr_cli.store.files import current_umask, filled_then_renamed


def _incr(*args: object, umask: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "incr_cli", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=lambda: os.umask(umask), timeout=300)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_version_and_its_export_have_the_umask_modes(tmp_path, tiny_recipe_path, umask):
    ws = tmp_path / "ws"
    r = _incr("init", ws, "--base", "scratch:tiny", "--recipe", tiny_recipe_path, umask=umask)
    assert r.returncode == 0, r.stderr
    r = _incr("export", ws, tmp_path / "out", umask=umask)
    assert r.returncode == 0, r.stderr
    want = 0o666 & ~umask
    for folder in (ws / "checkpoints" / "v0000", tmp_path / "out"):
        modes = _modes(folder)
        assert "model.safetensors" in modes
        wrong = {name: oct(mode) for name, mode in modes.items() if mode != want}
        assert not wrong, f"{folder.name}: not {oct(want)}: {wrong}"


def test_current_umask_reads_the_process_umask_without_changing_it():
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027 and current_umask() == 0o027
    finally:
        os.umask(old)


def test_a_staged_folder_opens_a_0600_file_to_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with filled_then_renamed(tmp_path / "tmp", tmp_path / "final") as tmp:
            secret = tmp / "weights.bin"
            secret.write_bytes(b"x")
            secret.chmod(0o600)  # what safetensors does
        assert stat.S_IMODE((tmp_path / "final" / "weights.bin").stat().st_mode) == 0o644
    finally:
        os.umask(old)
