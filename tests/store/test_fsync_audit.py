"""The fsync and rename audit: every file or folder that is renamed into place was fsynced first
(its files and folders, after their last change), and the folders on both sides of the rename are
fsynced after it, so that a power cut leaves the old state or the new one, never a name pointing at
data that was not on disk.

A syscall shim (``os.fsync``, ``os.replace``, ``os.rename``, which ``Path.rename`` uses) records
what each command of a workspace's life does: init, ingest, train-increment with periodic
resumable state, eval. Writes themselves are not intercepted (safetensors writes from Rust); a
change after the last fsync shows as a size or mtime that moved between the fsync and the rename.
Out of scope: sqlite's own journal (``PRAGMA synchronous=FULL``) and the lock file (never renamed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers_reliability import cli
from tests.helpers_train import excerpt


@dataclass
class Audit:
    """What the shim saw: fsynced paths with their (size, mtime) then, and renames in order."""

    synced: dict[str, tuple[int, int]] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # ("fsync", path, "") / ("rename", src, dst)
    problems: list[str] = field(default_factory=list)
    renames: int = 0

    def fsync(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        st = os.fstat(fd)
        self.synced[path] = (st.st_size, st.st_mtime_ns)
        self.events.append(("fsync", path, ""))

    def rename(self, src: os.PathLike | str, dst: os.PathLike | str) -> None:
        """Before the rename: everything under ``src`` is on disk as it is now."""
        src, dst = Path(os.path.abspath(src)), Path(os.path.abspath(dst))
        self.renames += 1
        inside_staged = any(p.name.startswith("tmp-") and p.parent.name == "staging" for p in dst.parents)
        if src.is_symlink():  # a link (WS/current) is only a directory entry: its folder holds it
            if str(src.parent) not in self.synced:
                self.problems.append(f"{src} renamed to {dst} before its folder was fsynced")
        elif not inside_staged:  # a rename inside a staged folder is made durable by the folder's own
            tree = [src, *sorted(src.rglob("*"))] if src.is_dir() else [src]
            for path in tree:
                st = path.stat()
                seen = self.synced.get(str(path))
                if seen is None:
                    self.problems.append(f"{path} renamed to {dst} without an fsync")
                elif not path.is_dir() and seen != (st.st_size, st.st_mtime_ns):
                    self.problems.append(f"{path} changed after its fsync, then renamed to {dst}")
        self.events.append(("rename", str(src), str(dst)))

    def check_folders_synced_after(self) -> None:
        """After each rename, the folder it left and the folder it entered are fsynced."""
        for i, (kind, src, dst) in enumerate(self.events):
            if kind != "rename":
                continue
            later = {path for k, path, _ in self.events[i + 1:] if k == "fsync"}
            for folder in {str(Path(src).parent), str(Path(dst).parent)}:
                if folder not in later:
                    self.problems.append(f"{src} -> {dst}: folder {folder} not fsynced after the rename")


@pytest.fixture
def audit(monkeypatch) -> Audit:
    seen = Audit()
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        seen.fsync(fd)
        return real_fsync(fd)

    def replace(src, dst, **kw):
        seen.rename(src, dst)
        return real_replace(src, dst, **kw)

    def rename(src, dst, **kw):
        seen.rename(src, dst)
        return real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return seen


def test_every_rename_into_place_is_fsynced_before_and_after(tmp_path, tiny_recipe_path, audit):
    root = tmp_path / "ws"
    texts = tmp_path / "texts"
    texts.mkdir()
    steps = [
        ("init", root, "--base", "scratch:tiny", "--recipe", tiny_recipe_path),
        ("ingest", root, excerpt("austen.txt", slice(0, 200), texts), "--name", "austen"),
        ("train-increment", root, "train.steps=4", "runtime.save_every=2", "eval.max_sequences=8"),
        ("eval", root, "eval.max_sequences=8", "--out", tmp_path / "eval.json"),
    ]
    for args in steps:
        result = cli(*args)
        assert result.exit_code == 0, result.output
    audit.check_folders_synced_after()
    assert not audit.problems, "\n".join(audit.problems)
    renamed = [dst for kind, _, dst in audit.events if kind == "rename"]
    # What was audited: the version folders, the increment, LATEST, the resumable state's pointer,
    # manifests and recipe, the eval cache and result.
    for name in ("checkpoints/v0000", "checkpoints/v0001", "data/d0001-austen", "LATEST", "CURRENT",
                 "recipe.yaml", "eval.json"):
        assert any(dst.endswith(name) for dst in renamed), (name, renamed)
    assert any("/eval/cache/" in dst for dst in renamed) and audit.renames >= 10
