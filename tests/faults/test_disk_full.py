"""A real full disk at every place that writes: the workspace on a small tmpfs that this test mounts
(root only; skipped with the reason elsewhere), filled to leave an exact number of bytes free.

Each failure must be one line ``no space left on device: <what>, <where>[, needs ~N MB]; free
space and rerun the same command``, exit 1, nothing half-written (no version, no increment, no torn
resumable state, LATEST unchanged, `verify --all` clean), and the same command must succeed once
space is back, ending where an uninterrupted run ends. Where the free-space check before a large
write would refuse first, the tests turn it off (``diskspace.check_free``) so that the library's own
error (torch.save's RuntimeError, safetensors' SafetensorError, sqlite's OperationalError, OSError)
is what gets recognised; one test keeps the check and expects its message.
"""

from __future__ import annotations

import json

import pytest

from incr_cli.data import ingest as ingest_module
from incr_cli.errors import DiskFull
from incr_cli.model import weights as models
from incr_cli.store import diskspace
from incr_cli.store.workspace import Workspace
from incr_cli.training.checkpointing import ResumeStore
from tests.helpers_reliability import (
    ARGS,
    FAST,
    PAGE,
    assert_one_error_line,
    assert_only_complete_versions,
    cli,
    mount_small_disk,
    page_bytes,
    rerun_equals,
    uninterrupted,
)
from tests.helpers_train import excerpt

NO_PERIODIC_STATE = ["train.steps=6", "runtime.save_every=0", *FAST]  # the same run key as ARGS


@pytest.fixture
def disk(tmp_path):
    small, unmount = mount_small_disk(tmp_path / "fs", size_mb=24)
    yield small
    unmount()  # also after a failure: a finalizer, never left mounted


@pytest.fixture
def ws(disk, workspace_copy) -> Workspace:
    """The two_increments workspace (v0001, d0002-fortunes pending) on the small disk."""
    return workspace_copy("two_increments", disk.root / "ws")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return uninterrupted(tmp_path_factory, ARGS)


@pytest.fixture
def no_precheck(monkeypatch):
    """Let the write start, so that the library meets the full disk itself."""
    monkeypatch.setattr(diskspace, "check_free", lambda what, where, needs: None)


def failed_on_full_disk(result, what: str, where, *raised: str) -> str:
    """Exit 1, one error line naming ``what`` and ``where``; the --debug traceback shows that the
    library's own error (``raised``: its type or words, the call that wrote) is what was recognised."""
    assert result.exit_code == 1, result.output
    line = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1, result.stderr
    assert line[0].startswith(f"error: no space left on device: {what}"), line[0]
    assert f", {where}" in line[0] and line[0].endswith("; free space and rerun the same command"), line[0]
    for words in raised:  # the traceback (--debug) of the original error; a tuple: one of its texts
        assert any(w in result.stderr for w in ((words,) if isinstance(words, str) else words)), (words, result.stderr)
    return line[0]


def fills_up_at(monkeypatch, disk, owner, name: str, free: int) -> None:
    """The disk fills up (``free`` bytes left) just as ``owner.name`` starts writing: the moment is
    exact whatever the run wrote before (lock, hash cache, earlier files)."""
    real = getattr(owner, name)

    def hooked(*args, **kwargs):
        disk.leave(free)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, hooked)


def weights_bytes(ws: Workspace) -> int:
    return page_bytes(ws.version_dir("v0001") / "model.safetensors")


def unchanged_then_space_back(ws: Workspace, disk, monkeypatch, reference: dict, args: list[str] = ARGS) -> None:
    """Nothing half-written, LATEST unchanged, verify clean; once space is back (and the disk no
    longer fills up) the same command ends equal to an uninterrupted run."""
    assert ws.versions() == ["v0000", "v0001"] and ws.latest() == "v0001"
    assert not list(ws.staging.glob("tmp-*")) and not list(ws.resume_dir.glob("*/state-*"))
    assert_only_complete_versions(ws)
    monkeypatch.undo()
    disk.release()
    rerun_equals(ws, reference, args, resumed_from=None)


# ----------------------------------------------------------------------------- train-increment


STATE_CASES = {
    # bytes left as the first state save starts -> what its writer raises. meta.json takes a page.
    # torch.save meets the full disk either in its zip writer ("unexpected pos") or in the file's own
    # write (OSError ENOSPC), depending on where its buffered bytes land: either is torch.save's error
    "rng file (torch.save)": (lambda ws: 2 * PAGE, (("unexpected pos", "OSError: [Errno 28] No space left on device"),
                                                    "torch/serialization.py", "_save_file(rng")),
    "weights (safetensors)": (lambda ws: 8 * PAGE, ("SafetensorError", "os error 28", "save_model(")),
    "optimizer state (torch.save)": (lambda ws: weights_bytes(ws) + 8 * PAGE,
                                     ("RuntimeError", "unexpected pos", "_save_file(trainer")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(STATE_CASES))
def test_resumable_state_on_a_full_disk(ws, disk, reference, no_precheck, monkeypatch, case):
    leave, raised = STATE_CASES[case]
    fills_up_at(monkeypatch, disk, ResumeStore, "save", leave(ws))
    result = cli("--debug", "train-increment", ws.root, *ARGS)
    failed_on_full_disk(result, "resumable state", ws.resume_dir, *raised)
    unchanged_then_space_back(ws, disk, monkeypatch, reference)  # the torn state folder was removed


@pytest.mark.slow
def test_the_free_space_check_refuses_a_state_that_cannot_fit(ws, disk, reference, monkeypatch):
    fills_up_at(monkeypatch, disk, ResumeStore, "save", 8 * PAGE)
    result = cli("train-increment", ws.root, *ARGS)
    assert result.exit_code == 1, result.output
    line = assert_one_error_line(result.stderr, "no space left on device: resumable state, ", ", needs ~",
                                 " MB; free space and rerun the same command")
    needs = float(line.split("needs ~")[1].split(" MB")[0])
    assert needs * 1e6 >= 3 * weights_bytes(ws) * 0.9  # weights + Adam's two moments
    unchanged_then_space_back(ws, disk, monkeypatch, reference)


VERSION_CASES = {
    # bytes left as the version write starts (no periodic state) -> the writer that runs out first
    "weights (safetensors)": (lambda ws: 8 * PAGE, ("SafetensorError", "os error 28", "model.save_pretrained(")),
    # config.json and tokenizer_config.json fit, tokenizer.json (16 pages) does not
    "tokenizer (OSError)": (lambda ws: weights_bytes(ws) + 3 * PAGE, ("No space left on device",
                                                                      "tokenizer.save_pretrained(")),
    "manifest (OSError)": (lambda ws: page_bytes(*[p for p in ws.version_dir("v0001").iterdir()
                                                   if p.name != "manifest.json"]),
                           ("OSError: [Errno 28]", "seal_folder(")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(VERSION_CASES))
def test_version_on_a_full_disk(ws, disk, reference, no_precheck, monkeypatch, case):
    leave, raised = VERSION_CASES[case]
    fills_up_at(monkeypatch, disk, models, "save_version", leave(ws))
    result = cli("--debug", "train-increment", ws.root, *NO_PERIODIC_STATE)
    failed_on_full_disk(result, "version v0002", ws.checkpoints, *raised)
    unchanged_then_space_back(ws, disk, monkeypatch, reference, NO_PERIODIC_STATE)


# ----------------------------------------------------------------------------- ingest


@pytest.fixture(scope="module")
def fortunes_reference(tmp_path_factory, workspace_copy) -> dict:
    """The uninterrupted ingest of the same excerpt into the same workspace, on an ordinary disk."""
    ref = workspace_copy("two_increments", tmp_path_factory.mktemp("ingest-ref") / "ws")
    text = excerpt("pydocs.txt", slice(0, 300), tmp_path_factory.mktemp("texts"))
    assert cli("ingest", ref.root, text, "--name", "pydocs").exit_code == 0
    return {"text": text, "shards": _shards(ref, "d0003-pydocs"), "index": _index_rows(ref)}


def _shards(ws: Workspace, inc: str) -> dict[str, bytes]:
    return {name: (ws.increment_dir(inc) / name).read_bytes() for name in ("train.bin", "heldout.bin", "doc_hashes.bin")}


def _index_rows(ws: Workspace) -> list:
    import sqlite3

    with sqlite3.connect(ws.index_path) as conn:
        return sorted(conn.execute("SELECT hex(hash), increment FROM documents").fetchall())


INGEST_CASES = {
    # where the disk fills up -> what runs out: the spool and shards, or sqlite rebuilding a lost index
    "shards (OSError)": ("_write_increment", False, ("OSError: [Errno 28]",)),
    "dedup index rebuilt (sqlite)": ("recover_index", True, ("OperationalError", "database or disk is full")),
}


@pytest.mark.parametrize("case", list(INGEST_CASES))
def test_ingest_on_a_full_disk(ws, disk, fortunes_reference, monkeypatch, case):
    where, drop_index, raised = INGEST_CASES[case]
    if drop_index:  # a lost index is rebuilt from the increments' doc_hashes.bin: sqlite writes first
        for suffix in ("", "-wal", "-shm"):
            ws.index_path.with_name(ws.index_path.name + suffix).unlink(missing_ok=True)
    before = ws.increments()
    fills_up_at(monkeypatch, disk, ingest_module, where, 0)
    result = cli("--debug", "ingest", ws.root, fortunes_reference["text"], "--name", "pydocs")
    failed_on_full_disk(result, "increment d0003-pydocs", ws.data, *raised)
    assert ws.increments() == before and not list(ws.staging.glob("tmp-*"))
    assert_only_complete_versions(ws)
    monkeypatch.undo()
    disk.release()
    rerun = cli("ingest", ws.root, fortunes_reference["text"], "--name", "pydocs")
    assert rerun.exit_code == 0, rerun.output
    assert ws.increments() == [*before, "d0003-pydocs"]
    assert _shards(ws, "d0003-pydocs") == fortunes_reference["shards"]  # byte for byte
    assert _index_rows(ws) == fortunes_reference["index"]
    assert_only_complete_versions(ws)


# ----------------------------------------------------------------------------- eval


def test_eval_cache_and_result_on_a_full_disk(ws, disk):
    eval_args = ["eval", ws.root, "--versions", "v0000,v0001", "eval.max_sequences=8", "--json"]
    disk.leave(0)
    result = cli("--debug", *eval_args)
    failed_on_full_disk(result, "eval cache", ws.eval_dir / "cache", "OSError")
    assert not list(ws.eval_dir.glob("*.json"))
    disk.release()
    first = cli(*eval_args)  # fills the cache and writes a result
    assert first.exit_code == 0, first.output
    results = sorted(ws.eval_dir.glob("*.json"))
    disk.leave(0)
    result = cli("--debug", *eval_args)  # every cell cached: only the result is written
    failed_on_full_disk(result, "eval result", ws.eval_dir, "OSError")
    assert sorted(ws.eval_dir.glob("*.json")) == results and not list(ws.eval_dir.glob(".*.tmp"))
    disk.release()
    again = cli(*eval_args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["matrix"] == json.loads(first.stdout)["matrix"]
    assert len(list(ws.eval_dir.glob("*.json"))) == len(results) + 1


# ----------------------------------------------------------------------------- init


def test_init_on_a_full_disk_refuses_before_writing_and_leaves_no_workspace(disk, tiny_recipe_path, monkeypatch):
    """v0000 cannot fit: the free-space check refuses before the write and names what it needs."""
    root = disk.root / "ws"
    fills_up_at(monkeypatch, disk, models, "save_version", 8 * PAGE)
    result = cli("init", root, "--base", "scratch:tiny", "--recipe", tiny_recipe_path)
    line = failed_on_full_disk(result, "version v0000", root / "checkpoints")
    assert ", needs ~" in line
    assert not root.exists()  # init removes the workspace it created
    monkeypatch.undo()
    disk.release()
    again = cli("init", root, "--base", "scratch:tiny", "--recipe", tiny_recipe_path)
    assert again.exit_code == 0, again.output
    assert Workspace.open(root).versions() == ["v0000"]


# ----------------------------------------------------------------------------- history.jsonl


def test_a_history_record_on_a_full_disk_is_named_and_leaves_the_file_as_it_was(disk):
    from incr_cli.store.files import append_line, read_lines

    path = disk.root / "history.jsonl"
    append_line(path, {"to": "v0001"})
    before = path.read_bytes()
    disk.leave(0)
    with pytest.raises(DiskFull, match=f"no space left on device: history.jsonl, {disk.root}"):
        append_line(path, {"to": "v0002", "reason": "x" * 8192})  # more than the page it already has
    assert path.read_bytes() == before  # no torn line
    disk.release()
    append_line(path, {"to": "v0002"})
    assert [r["to"] for r in read_lines(path)[0]] == ["v0001", "v0002"]
