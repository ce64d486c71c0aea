"""Integrity and security through the CLI: a damaged version is named by every command that would use
it (exit 2, one line, no traceback), the sha256 check is cached, pickle/YAML/remote code never run,
and no argument makes a writing command write outside the workspace."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from conftest import write_tiny_model_dir

from incr_cli.config.recipe import load_recipe, recipe_to_dict
from incr_cli.store import workspace as workspace_mod
from incr_cli.store.workspace import Workspace, seal_folder
from tests.helpers_reliability import assert_one_error_line, cli
from tests.helpers_train import REPO, SAMPLES

FAST = ["eval.max_sequences=8", "runtime.num_threads=1"]
TEXT = "it is a truth universally [MASK]"


@pytest.fixture
def ws(tmp_path, workspace_copy) -> Workspace:
    """v0000 (scratch:tiny) with d0001-austen pending, so train-increment has work to do."""
    return workspace_copy("one_pending", tmp_path / "ws")


def _v0(ws: Workspace) -> Path:
    return ws.version_dir("v0000")


def _edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _truncate(ws: Workspace) -> None:
    weights = _v0(ws) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])


def _alter_keeping_size_and_mtime(ws: Workspace) -> None:
    weights = _v0(ws) / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight: a valid file with a wrong checksum
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


def _escape(ws: Workspace) -> None:
    _edit_manifest(_v0(ws), lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0" * 64, "size": 1}}))


def _symlink_out(ws: Workspace) -> None:
    outside = ws.root.parent / "elsewhere.json"
    target = _v0(ws) / "tokenizer.json"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)


DAMAGES = {
    # name: (damage, what the one error line must say besides "v0000")
    "truncated weights": (_truncate, "file model.safetensors has"),
    "altered weights, same size and mtime": (_alter_keeping_size_and_mtime,
                                             "file model.safetensors does not match its sha256"),
    "missing tokenizer file": (lambda ws: (_v0(ws) / "tokenizer.json").unlink(), "file tokenizer.json is missing"),
    "unparsable manifest": (lambda ws: (_v0(ws) / "manifest.json").write_text("{oops"),
                            "manifest.json: cannot be parsed"),
    "newer manifest format": (lambda ws: _edit_manifest(_v0(ws), lambda m: m.update(format=99)),
                              "manifest.json: format 99 is newer than this incr understands"),
    "manifest path outside the folder": (_escape, "file path '../../etc/passwd' points outside"),
    "file symlinked out of the folder": (_symlink_out, "file path 'tokenizer.json' points outside"),
}

COMMANDS = {
    "train-increment": lambda ws: ["train-increment", ws.root, "train.steps=1", *FAST],
    "eval": lambda ws: ["eval", ws.root, *FAST],
    "fill-mask": lambda ws: ["fill-mask", ws.root, TEXT],
    "verify": lambda ws: ["verify", ws.root],
}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and "staging" not in p.parts and "eval" not in p.parts and p.name != ".incr.lock"}


# ----------------------------------------------------------------------------- damaged versions


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_version_is_named_by_every_command(ws, damage):
    ws.verify_version("v0000")  # a warm hash cache must not hide the damage
    apply, message = DAMAGES[damage]
    apply(ws)
    before = _tree(ws.root)
    for name, args in COMMANDS.items():
        result = cli(*args(ws))
        assert result.exit_code == 2, (name, result.output)
        assert_one_error_line(result.stderr, "v0000", message)
    assert ws.versions() == ["v0000"] and _tree(ws.root) == before  # nothing written, nothing "repaired"


def test_eval_with_every_cell_cached_still_checks_the_version(ws):
    """A repeated eval loads no model, but it must not report scores of a version damaged since."""
    first = cli("eval", ws.root, *FAST)
    assert first.exit_code == 0, first.output
    _truncate(ws)
    result = cli("eval", ws.root, *FAST)
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, "v0000: file model.safetensors has")


@pytest.mark.parametrize("file, damage, message", [
    ("train.bin", lambda f: f.write_bytes(f.read_bytes()[:100]), "file train.bin has 100 bytes"),
    ("heldout.bin", lambda f: f.write_bytes(b"\x01" * f.stat().st_size), "file heldout.bin does not match its sha256"),
])
def test_a_damaged_increment_is_named_before_training(ws, file, damage, message):
    damage(ws.increment_dir("d0001-austen") / file)
    for args in (["train-increment", ws.root, "train.steps=1", *FAST], ["verify", ws.root]):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert_one_error_line(result.stderr, "d0001-austen", message)
    assert ws.versions() == ["v0000"]


# ----------------------------------------------------------------------------- the sha256 cache


def test_sha256_is_cached_across_commands_and_redone_for_a_changed_file(ws, monkeypatch):
    hashed: list[str] = []
    real = workspace_mod.sha256_file

    def counting(path, *args, **kwargs):
        hashed.append(Path(path).relative_to(ws.root).as_posix())
        return real(path, *args, **kwargs)

    monkeypatch.setattr(workspace_mod, "sha256_file", counting)
    version_files = {f"checkpoints/v0000/{rel}" for rel in ws.version_manifest("v0000")["files"]}

    assert cli("fill-mask", ws.root, TEXT).exit_code == 0
    assert set(hashed) == version_files  # the first use hashes every file once
    hashed.clear()
    assert cli("fill-mask", ws.root, TEXT).exit_code == 0
    assert cli("train-increment", ws.root, "--dry-run").exit_code == 0
    assert hashed == []  # unchanged files: stat matches the cache, nothing is read again

    tokenizer = _v0(ws) / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes())  # same bytes, new mtime/ctime
    assert cli("fill-mask", ws.root, TEXT).exit_code == 0
    assert hashed == ["checkpoints/v0000/tokenizer.json"]

    hashed.clear()
    assert cli("verify", ws.root).exit_code == 0  # on demand: every byte, cache or not
    assert version_files <= set(hashed)


def test_a_garbled_verify_cache_is_ignored(ws):
    ws.staging.mkdir(exist_ok=True)
    (ws.staging / "verify-cache.json").write_text("{not json")
    assert cli("fill-mask", ws.root, TEXT).exit_code == 0
    _truncate(ws)
    assert cli("fill-mask", ws.root, TEXT).exit_code == 2


# ----------------------------------------------------------------------------- security


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_weights_are_refused_at_init_without_allow_pickle(tmp_path, name):
    """test_cli_workspace.py shows --allow-pickle then loads a real .bin with a warning."""
    base = write_tiny_model_dir(tmp_path / "base")
    (base / "model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    (base / name).write_bytes(pickle.dumps(_Payload(marker)))
    result = cli("init", tmp_path / "ws", "--base", base)
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, f"only pickle weights ({name})", "--allow-pickle")
    assert not marker.exists() and not (tmp_path / "ws").exists()


def test_a_version_folder_is_only_ever_loaded_from_safetensors(ws, tmp_path):
    """Even a pickle listed in a (resealed) manifest is never unpickled: safetensors or nothing."""
    marker = tmp_path / "UNPICKLED"
    folder = _v0(ws)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    manifest = json.loads((folder / "manifest.json").read_text())
    seal_folder(folder, {k: v for k, v in manifest.items() if k != "files"})
    assert cli("verify", ws.root).exit_code == 0  # the checksums match: only the loader stands in the way
    for args in (["fill-mask", ws.root, TEXT], ["train-increment", ws.root, "train.steps=1", *FAST]):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert_one_error_line(result.stderr, "v0000: file model.safetensors is missing")
    assert not marker.exists()


def test_yaml_tags_in_a_recipe_or_override_are_recipe_errors(ws, tmp_path):
    marker = tmp_path / "EXECUTED"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'train:\n  steps: !!python/object/apply:os.system ["touch {marker}"]\n')
    for args, message in (
            (["train-increment", ws.root, "--recipe", evil], "invalid YAML"),
            (["ingest", ws.root, SAMPLES / "pydocs.txt", "--recipe", evil], "invalid YAML"),
            # an override that is not plain YAML stays a string, which the schema refuses
            (["train-increment", ws.root, f'train.steps=!!python/object/apply:os.system ["touch {marker}"]'],
             "train.steps: expected an integer, got '!!python/object/apply")):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "Traceback" not in result.output
    assert not marker.exists() and ws.versions() == ["v0000"] and ws.increments() == ["d0001-austen"]


def test_remote_code_never_runs_unless_the_recipe_says_so(tmp_path):
    """A base whose config maps AutoModelForMaskedLM to its own module: the module is not imported."""
    marker = tmp_path / "EXECUTED"
    base = write_tiny_model_dir(tmp_path / "base")
    (base / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertForMaskedLM\nclass EvilForMaskedLM(BertForMaskedLM):\n    pass\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForMaskedLM": "modeling_evil.EvilForMaskedLM"}
    (base / "config.json").write_text(json.dumps(config))
    assert not load_recipe(None).model.trust_remote_code
    assert not any(load_recipe(p).model.trust_remote_code for p in (REPO / "recipes").glob("*.yaml"))

    result = cli("init", tmp_path / "ws", "--base", base, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source"]["architecture"] == "BertForMaskedLM"
    assert cli("fill-mask", tmp_path / "ws", TEXT).exit_code == 0
    assert not marker.exists()


@pytest.mark.parametrize("args, message", [
    (["ingest", "{ws}", "{src}", "--name", "../../outside"], "increment name '../../outside'"),
    (["ingest", "{ws}", "{src}", "--name", "/tmp/outside"], "increment name '/tmp/outside'"),
    (["train-increment", "{ws}", "--parent", "../../v0000"], "unknown version '../../v0000'"),
    (["eval", "{ws}", "--versions", "../v0000"], "unknown version '../v0000'"),
    (["eval", "{ws}", "--data", "../data/d0001-austen"], "unknown increment '../data/d0001-austen'"),
])
def test_arguments_cannot_name_paths_outside_the_workspace(ws, tmp_path, args, message):
    src = tmp_path / "notes.txt"
    src.write_text("a note about the weather in highbury and the garden\n" * 3)
    result = cli(*[a.format(ws=ws.root, src=src) for a in args])
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, message)
    assert not (tmp_path / "outside").exists() and not Path("/tmp/outside").exists()


def test_ingest_and_train_write_only_inside_the_workspace(ws, tmp_path, monkeypatch):
    """Every file outside WORKSPACE (and in the working directory) is unchanged after ingest, a
    training run with replay and distillation, eval and fill-mask."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / "fortunes.txt"
    src.write_text("\n".join((SAMPLES / "fortunes.txt").read_text().splitlines()[:200]) + "\n")

    def outside() -> dict[str, tuple[int, int]]:
        return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in tmp_path.rglob("*")
                if ws.root not in p.parents and p != ws.root}

    recipe_keys = [f"{section}.{key}" for section, keys in recipe_to_dict(load_recipe(None)).items() for key in keys]
    assert not [k for k in recipe_keys if any(w in k for w in ("path", "dir", "file", "output"))]  # none names a place

    before = outside()
    assert cli("train-increment", ws.root, "train.steps=2", *FAST).exit_code == 0
    assert cli("ingest", ws.root, src).exit_code == 0
    assert cli("train-increment", ws.root, "train.steps=2", *FAST).exit_code == 0
    assert cli("eval", ws.root, *FAST).exit_code == 0
    assert cli("fill-mask", ws.root, TEXT, "--versions", "v0001,v0002").exit_code == 0
    assert ws.versions() == ["v0000", "v0001", "v0002"]
    assert outside() == before
