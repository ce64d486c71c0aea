"""workspace.py: the lock, atomic folders and LATEST, checksums and manifest checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from incr_cli.errors import IntegrityError, UsageError, WorkspaceLocked
from incr_cli.store.files import folder_beside
from incr_cli.store.workspace import Workspace, base_manifest, seal_folder

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from incr_cli.store.workspace import Workspace
    with Workspace(sys.argv[1]).lock("ingest"):
        print("held", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def holder(tmp_path: Path):
    """A subprocess that holds the lock of ``tmp_path`` until the test ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_second_writer_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(WorkspaceLocked, match=rf"PID {holder.pid} .*\(ingest") as info:
        Workspace(tmp_path).lock("train-increment").acquire()
    assert info.value.exit_code == 75


def test_lock_of_a_killed_holder_is_taken_over(tmp_path, holder):
    holder.kill()
    holder.wait()
    lock = Workspace(tmp_path).lock("init")
    with lock:
        assert lock.took_over is not None and lock.took_over.pid == holder.pid
        assert json.loads((tmp_path / ".incr.lock").read_text())["pid"] == os.getpid()


def test_stale_lock_file_with_dead_pid_is_taken_over(tmp_path):
    (tmp_path / ".incr.lock").write_text(json.dumps({"pid": 999999, "host": "h", "command": "ingest", "started": "x"}))
    with Workspace(tmp_path).lock("init") as lock:
        assert lock.took_over.pid == 999999
    assert (tmp_path / ".incr.lock").read_text() == ""  # released: the record is cleared


def test_staged_folder_leaves_nothing_on_exception(tmp_path):
    ws = Workspace(tmp_path)
    final = ws.checkpoints / "v0001"
    with pytest.raises(RuntimeError), ws.staged_folder(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert not final.exists() and not list(ws.staging.iterdir())
    assert ws.versions() == []


def test_staged_folder_refuses_to_overwrite(tmp_path):
    ws = Workspace(tmp_path)
    (ws.checkpoints / "v0001").mkdir(parents=True)
    with pytest.raises(IntegrityError, match="never overwritten"), ws.staged_folder(ws.checkpoints / "v0001") as tmp:
        (tmp / "x").write_text("new")
    assert not list(ws.staging.iterdir()) and not (ws.checkpoints / "v0001" / "x").exists()


def test_latest_is_replaced_atomically(tiny_workspace):
    ws = tiny_workspace
    assert ws.move_latest("v0000", command="test") is None  # already LATEST: nothing moves, nothing recorded
    assert ws.latest_path.read_text() == "v0000\n" and ws.latest() == "v0000"
    assert not [p for p in ws.root.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind
    ws.latest_path.write_text("v0007\n")
    with pytest.raises(IntegrityError, match="v0007"):
        ws.latest()


def test_resolve_version_and_open_errors(tiny_workspace, tmp_path):
    ws = tiny_workspace
    assert ws.resolve_version(None) == ws.resolve_version("0") == "v0000"
    with pytest.raises(UsageError, match="unknown version 'v0003'"):
        ws.resolve_version("v0003")
    with pytest.raises(UsageError, match="no such workspace"):
        Workspace.open(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="not an incr workspace"):
        Workspace.open(tmp_path / "plain")


def test_verify_passes_on_a_fresh_version(tiny_workspace):
    manifest = tiny_workspace.verify_version("v0000")
    assert manifest["version"] == "v0000" and "model.safetensors" in manifest["files"]


def _v0(ws: Workspace) -> Path:
    return ws.version_dir("v0000")


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(f.read_bytes()[:-10]), r"v0000: file model\.safetensors has \d+ bytes.*truncated"),
    (lambda f: f.write_bytes(f.read_bytes()[:-1] + b"\x01"), r"v0000: file model\.safetensors does not match its sha256"),
    (lambda f: f.unlink(), r"v0000: file model\.safetensors is missing"),
])
def test_verify_detects_damaged_weights(tiny_workspace, damage, message):
    ws = tiny_workspace
    ws.verify_version("v0000")  # warm the hash cache: a changed file must still be caught
    target = _v0(ws) / "model.safetensors"
    before = target.stat().st_mtime_ns if target.exists() else None
    damage(target)
    if before is not None and target.exists():
        os.utime(target, ns=(before, before))  # same mtime: the cache must not hide the change
    with pytest.raises(IntegrityError, match=message):
        ws.verify_version("v0000")


def test_verify_detects_unparsable_and_newer_manifests(tiny_workspace):
    ws = tiny_workspace
    path = _v0(ws) / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(IntegrityError, match="cannot be parsed"):
        ws.verify_version("v0000")
    path.write_text(json.dumps({**good, "format": 99}))
    with pytest.raises(IntegrityError, match="format 99 is newer"):
        ws.verify_version("v0000")
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        ws.verify_version("v0000")


@pytest.mark.parametrize("rel", ["../../LATEST", "/etc/passwd", "sub/../../x"])
def test_manifest_paths_cannot_escape_the_folder(tiny_workspace, rel):
    ws = tiny_workspace
    path = _v0(ws) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][rel] = {"sha256": "0" * 64, "size": 1}
    path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="points outside"):
        ws.verify_version("v0000")


def test_seal_folder_records_every_file(tmp_path):
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.bin").write_bytes(b"bb")
    manifest = seal_folder(folder, base_manifest("version", version="v0001"))
    assert set(manifest["files"]) == {"a.txt", "sub/b.bin"}
    assert manifest["files"]["sub/b.bin"]["size"] == 2
    assert json.loads((folder / "manifest.json").read_text()) == manifest


def test_next_names_and_pending(tiny_workspace):
    ws = tiny_workspace
    assert ws.next_version() == "v0001"
    assert ws.next_increment("austen") == "d0001-austen"
    with pytest.raises(UsageError, match="increment name"):
        ws.next_increment("../evil")
    assert ws.pending("v0000") == [] and ws.trained_on("v0000") == []


def _version_folder(ws: Workspace, version: str, parent: str | None) -> None:
    folder = ws.version_dir(version)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "version": version, "parent": parent}))


def test_lineage_runs_oldest_first_stops_at_a_removed_parent_and_refuses_a_loop(tmp_path):
    ws = Workspace(tmp_path)
    _version_folder(ws, "v0000", None)
    _version_folder(ws, "v0001", "v0000")
    _version_folder(ws, "v0002", "v0001")
    assert ws.lineage("v0002") == ["v0000", "v0001", "v0002"]
    _version_folder(ws, "v0004", "v0003")  # v0003 removed: the chain still present
    assert ws.lineage("v0004") == ["v0004"]
    _version_folder(ws, "v0005", "v0006")
    _version_folder(ws, "v0006", "v0005")
    with pytest.raises(IntegrityError, match="the parent chain loops back to v0005"):
        ws.lineage("v0005")


def test_missing_latest_points_at_the_intact_versions_not_at_init(tiny_workspace):
    from incr_cli.errors import IntegrityError

    tiny_workspace.latest_path.unlink()
    with pytest.raises(IntegrityError, match="LATEST: missing.*v0000"):
        Workspace.open(tiny_workspace.root)


def test_copy_to_takes_the_model_line_but_not_the_lock_or_staging(tiny_workspace, tmp_path):
    ws = tiny_workspace
    ws.verify_version("v0000")  # fills staging/verify-cache.json
    (ws.resume_dir / "somekey").mkdir(parents=True)
    with ws.lock("test"):
        copy = ws.copy_to(tmp_path / "copy")
    assert copy.latest() == ws.latest() == "v0000" and copy.versions() == ws.versions()
    copy.verify_folder(copy.version_dir("v0000"), use_cache=False)
    assert copy.recipe_path.read_text() == ws.recipe_path.read_text()
    assert not (copy.root / ".incr.lock").exists() and not copy.staging.exists()
    assert (ws.resume_dir / "somekey").is_dir()  # the source is untouched
    with copy.lock("test"):  # the copy is a workspace of its own
        pass


def test_verifying_many_folders_writes_the_verify_cache_once(two_increments, monkeypatch):
    """A lineage's increments are verified with one write of the verify cache, not one per folder
    (the cost that grew with history), and a file altered afterwards is still caught."""
    import incr_cli.store.workspace as workspace

    ws = Workspace.open(two_increments.root)
    (ws.staging / "verify-cache.json").unlink(missing_ok=True)
    writes, write = [], workspace.atomic_write_text
    monkeypatch.setattr(workspace, "atomic_write_text", lambda path, text, what=None: (writes.append(path),
                                                                                       write(path, text, what)))
    folders = [*ws.increments(), *ws.versions()]
    with ws.verifying_many():
        for name in folders:
            ws.verify_folder(ws.increment_dir(name) if name.startswith("d") else ws.version_dir(name))
    assert writes == [ws.staging / "verify-cache.json"]
    cached = json.loads((ws.staging / "verify-cache.json").read_text())
    assert len(cached) == sum(len(ws.increment_manifest(d)["files"]) for d in ws.increments()) + sum(
        len(ws.version_manifest(v)["files"]) for v in ws.versions())
    heldout = ws.increment_dir(ws.increments()[0]) / "heldout.bin"
    data = bytearray(heldout.read_bytes())
    data[0] ^= 1
    heldout.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its sha256"), ws.verifying_many():
        ws.verify_increment(ws.increments()[0])


def test_folder_beside_appears_whole_or_not_at_all(tmp_path):
    """export's OUT and compress's new line: built in a hidden folder beside the final name, renamed."""
    final = tmp_path / "out"
    (tmp_path / ".out.job-dead0000").mkdir()  # left by a writer killed while it built the same name
    with pytest.raises(RuntimeError), folder_beside(final, "job") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed halfway")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the failed folder and the leftover are gone
    with folder_beside(final, "job") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.job-")
        (tmp / "whole.bin").write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (final / "whole.bin").read_bytes() == b"x"
