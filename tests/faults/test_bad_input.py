"""Bad input through the CLI, each with its message and exit code: recipes, ingest inputs, commands.

Ingest's reading of mixed input (good lines kept next to bad ones, 2000 small files, a 2 MB line,
unreadable and binary files among good ones) is in test_ingest.py; here each bad input comes alone,
so what a cron job sees (exit code, one line) is pinned."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from incr_cli.data import readers
from incr_cli.store.workspace import Workspace
from tests.helpers_reliability import assert_one_error_line, cli
from tests.helpers_train import SAMPLES

FAST = ["eval.max_sequences=8", "runtime.num_threads=1"]


@pytest.fixture
def ws(tmp_path, workspace_copy) -> Workspace:
    """v0000 (scratch:tiny) with d0001-austen pending."""
    return workspace_copy("one_pending", tmp_path / "ws")


def _untouched(ws: Workspace) -> None:
    assert ws.versions() == ["v0000"] and ws.increments() == ["d0001-austen"] and ws.latest() == "v0000"


# ----------------------------------------------------------------------------- recipes

RECIPE_CASES = {
    "unknown key": ("train.stepz=3", "train.stepz: unknown key (did you mean 'steps'?)"),
    "wrong type": ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    "negative size": ("train.batch_size=-1", "train.batch_size: -1 is out of range (must be >= 1)"),
    "zero size": ("model.max_seq_len=0", "model.max_seq_len: 0 is out of range (must be >= 8"),
    "probability above 1": ("masking.probability=1.5", "masking.probability: 1.5 is out of range (must be > 0, <= 1)"),
    "probability below 0": ("replay.ratio=-0.1", "replay.ratio: -0.1 is out of range (must be >= 0, < 1)"),
}


@pytest.mark.parametrize("case", RECIPE_CASES)
def test_a_bad_recipe_value_exits_2_naming_the_key(ws, tmp_path, case):
    override, message = RECIPE_CASES[case]
    section, rest = override.split(".", 1)
    key, value = rest.split("=", 1)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"{section}:\n  {key}: {value}\n")
    for args in (["train-increment", ws.root, override],  # on the command line
                 ["train-increment", ws.root, "--recipe", recipe],  # in a file
                 ["ingest", ws.root, SAMPLES / "pydocs.txt", override]):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert "1 problem" in result.stderr and message in result.stderr and "Traceback" not in result.output
    _untouched(ws)


def test_every_problem_of_a_recipe_is_reported_at_once(ws, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  stepz: 3\n  lr: fast\n  batch_size: 0\nmasking:\n  probability: 1.5\n")
    result = cli("train-increment", ws.root, "--recipe", recipe)
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, f"{recipe}: 4 problems")
    for key in ("train.stepz", "train.lr", "train.batch_size", "masking.probability"):
        assert f"  - {key}: " in result.stderr
    _untouched(ws)


def test_a_missing_or_unparsable_recipe_file_exits_2(ws, tmp_path):
    result = cli("train-increment", ws.root, "--recipe", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "nope.yaml: 1 problem" in result.stderr and "file not found" in result.stderr
    (tmp_path / "broken.yaml").write_text("train: [steps\n")
    result = cli("train-increment", ws.root, "--recipe", tmp_path / "broken.yaml")
    assert result.exit_code == 2 and "invalid YAML at line" in result.stderr
    _untouched(ws)


# ----------------------------------------------------------------------------- ingest inputs


def _invalid_utf8(d: Path) -> Path:
    (d / "latin1.txt").write_bytes("café au lait\nnaïve text here\n".encode("latin-1"))
    return d / "latin1.txt"


def _binary(d: Path) -> Path:
    (d / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02" + bytes(range(256)) * 20)
    return d / "blob.bin"


def _empty(d: Path) -> Path:
    (d / "empty.txt").write_bytes(b"")
    return d / "empty.txt"


def _malformed_jsonl(d: Path) -> Path:
    (d / "bad.jsonl").write_text('{not json\n[1, 2]\n{"body": "a text under another field"}\n')
    return d / "bad.jsonl"


def _symlink_loop(d: Path) -> Path:
    (d / "loop").mkdir()
    (d / "loop" / "self").symlink_to("self")
    (d / "loop" / "back").symlink_to("../loop")
    return d / "loop"


def _huge_line(d: Path) -> Path:
    (d / "huge.txt").write_text("word " * 400_000 + "\n")  # 2 MB, one line
    return d / "huge.txt"


def _truncated_parquet(d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"row {i} text" for i in range(100)]}), d / "cut.parquet")
    data = (d / "cut.parquet").read_bytes()
    (d / "cut.parquet").write_bytes(data[: len(data) // 2])  # the footer (its schema) is gone
    return d / "cut.parquet"


def _ragged_csv(d: Path) -> Path:
    (d / "ragged.csv").write_text("id,text\n1,a first good row of text\n2\n3,a second good row of text,extra\n")
    return d / "ragged.csv"


def _numbers_column(d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3], "body": [[1], [2], None]}), d / "numbers.parquet")
    return d / "numbers.parquet"


def _broken_zstd(d: Path) -> Path:
    import zstandard

    lines = "".join(f"zstd line {i} with some words in it\n" for i in range(4000)).encode()
    frame = zstandard.ZstdCompressor().compress(lines)
    (d / "cut.txt.zst").write_bytes(frame[: len(frame) * 3 // 4])
    return d / "cut.txt.zst"


def _dataset_dict_without_train(d: Path) -> Path:
    (d / "dd").mkdir()
    (d / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["validation", "test"]}))
    return d / "dd"


INGEST_CASES = {
    # name: (input, exit code, what the output says)
    "invalid UTF-8": (_invalid_utf8, 2, "every document read was rejected (invalid_utf8: 2)"),
    "binary": (_binary, 2, "blob.bin (binary)"),
    "empty": (_empty, 0, "nothing to ingest: the input holds no documents"),
    "malformed JSON Lines": (_malformed_jsonl, 2, "(malformed_json: 1, missing_field: 1, not_an_object: 1); the "
                                                  "records' text fields are body: choose one with --text-field"),
    "symlink loop": (_symlink_loop, 2, "(symlink_loop)"),
    "missing path": (lambda d: d / "nope.txt", 2, "nope.txt (missing)"),
    "huge single line": (_huge_line, 0, "cut to data.max_doc_chars  1"),
    "truncated Parquet": (_truncated_parquet, 0, "skipped files: corrupt"),
    "ragged CSV": (_ragged_csv, 0, "rejected: missing_field  1"),
    "non-string text column": (_numbers_column, 2, "every document read was rejected (missing_field: 3); check --format"),
    "broken zstd frame": (_broken_zstd, 0, "skipped files: corrupt"),
    "DatasetDict without a train split": (_dataset_dict_without_train, 2, "dd (no_train_split)"),
}


@pytest.mark.parametrize("case", INGEST_CASES)
def test_ingest_of_one_bad_input(ws, tmp_path, case):
    make, code, message = INGEST_CASES[case]
    (tmp_path / "in").mkdir()
    result = cli("ingest", ws.root, make(tmp_path / "in"), "data.max_doc_chars=1000")
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    if code:
        assert_one_error_line(result.stderr, message)
        assert ws.increments() == ["d0001-austen"]
    else:
        assert message in result.stdout
    assert not list(ws.staging.glob("tmp-*"))


def test_ingest_of_an_unreadable_file(ws, tmp_path, monkeypatch):
    """Root reads a chmod 000 file anyway, so the open is refused the way the kernel would."""
    src = tmp_path / "locked.txt"
    src.write_text("a perfectly good line of text about emma\n")

    def deny(path: str):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(readers, "open_binary", deny)
    result = cli("ingest", ws.root, src)
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, "nothing readable", "locked.txt (unreadable)")
    assert ws.increments() == ["d0001-austen"]


# ----------------------------------------------------------------------------- commands


def test_unknown_versions_and_increments_exit_2_listing_the_valid_ones(ws):
    for args, message in (
            (["fill-mask", ws.root, "a [MASK]", "--versions", "v0009"], "unknown version 'v0009'; valid versions: v0000"),
            (["train-increment", ws.root, "--parent", "v0009"], "unknown version 'v0009'; valid versions: v0000"),
            (["eval", ws.root, "--versions", "v0009"], "unknown version 'v0009'"),
            (["eval", ws.root, "--data", "d0042"], "unknown increment 'd0042'; valid increments: d0001-austen")):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert_one_error_line(result.stderr, message)
    _untouched(ws)


COMMANDS = {
    "status": lambda root: ["status", root],
    "verify": lambda root: ["verify", root],
    "ingest": lambda root: ["ingest", root, SAMPLES / "pydocs.txt"],
    "train-increment": lambda root: ["train-increment", root],
    "eval": lambda root: ["eval", root],
    "fill-mask": lambda root: ["fill-mask", root, "a [MASK]"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_that_is_not_a_workspace_exits_2(tmp_path, command):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine\n")
    for root, message in ((tmp_path / "plain", "not an incr workspace"), (tmp_path / "nope", "no such workspace")):
        result = cli(*COMMANDS[command](root))
        assert result.exit_code == 2, result.output
        assert_one_error_line(result.stderr, message, "incr init")
    assert os.listdir(tmp_path / "plain") == ["notes.txt"] and not (tmp_path / "nope").exists()


def test_a_newer_increment_manifest_format_exits_2(ws):
    path = ws.increment_dir("d0001-austen") / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 2}))
    for args in (["train-increment", ws.root, *FAST], ["verify", ws.root], ["eval", ws.root, *FAST]):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert_one_error_line(result.stderr, "d0001-austen/manifest.json: format 2 is newer", "upgrade incr")
    _untouched(ws)


def test_latest_naming_a_missing_version_exits_2(ws):
    ws.latest_path.write_text("v0007\n")
    for args in (["status", ws.root], ["train-increment", ws.root], ["fill-mask", ws.root, "a [MASK]"]):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert_one_error_line(result.stderr, "LATEST: names 'v0007', which is not a version here", "v0000")


# ----------------------------------------------------------------------------- hostile input (issue 21)

BOUND = 5000  # characters: whatever the input, a command's whole error output stays this small


def test_one_deeply_nested_jsonl_record_is_skipped_and_the_rest_ingested(ws, tmp_path):
    """50,000 nested arrays overflow Python's JSON parser: that record is counted, the next one kept."""
    src = tmp_path / "night.jsonl"
    src.write_text('{"text": ' + "[" * 50_000 + "]" * 50_000 + '}\n{"text": "a good record about emma and her friends"}\n')
    result = cli("ingest", ws.root, src)
    assert result.exit_code == 0, result.output
    assert f"rejected: too_deep  1 ({src}:1)" in result.stdout
    [new] = [inc for inc in ws.increments() if inc != "d0001-austen"]
    docs = ws.increment_manifest(new)["documents"]
    assert docs["kept"] == 1 and docs["rejected"] == {"too_deep": 1} and docs["rejected_at"] == {"too_deep": [f"{src}:1"]}


def _laughs() -> str:
    """Nine levels of nine references: 387 million values once expanded."""
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\ntrain:\n  lr: *i\n"


HOSTILE_RECIPES = {
    "nested 20,000 deep": ("train:\n  freeze: " + "[" * 20_000 + "]" * 20_000 + "\n",
                           "train.freeze: nested more than 32 levels deep (the limit)"),
    "billion laughs": (_laughs(), "e: 66,430 keys and values with its aliases expanded (the limit is 10,000)"),
    "over 1 MiB": ("# " + "x" * (1 << 20) + "\n", "larger than 1 MiB (the limit): is it a recipe?"),
    "a date that is no date": ("train:\n  lr: 2001-13-45\n", "invalid YAML at line 2, column 7: cannot read '2001-13-45'"),
}


@pytest.mark.parametrize("case", HOSTILE_RECIPES)
def test_a_hostile_recipe_exits_2_naming_the_key_and_the_limit(ws, tmp_path, case):
    text, message = HOSTILE_RECIPES[case]
    recipe = tmp_path / "hostile.yaml"
    recipe.write_text(text)
    for args in (["recipe", "validate", recipe], ["train-increment", ws.root, "--recipe", recipe]):
        result = cli(*args)
        assert result.exit_code == 2, result.output[:2000]
        assert message in result.stderr and len(result.output) < BOUND and "Traceback" not in result.output
    result = cli("recipe", "validate", recipe, "--json")
    assert result.exit_code == 2 and len(result.stdout) < BOUND
    assert message in json.loads(result.stdout)["problems"][str(recipe)][0]
    _untouched(ws)


def test_hostile_overrides_exit_2_naming_the_key_and_the_limit(ws):
    for override, message in (("train.freeze=" + "[" * 20_000 + "]" * 20_000, "train.freeze: nested more than 32"),
                              ("train.lr=" + "x" * 100_000, "train.lr: a value of 100,000 characters (the limit is 4,096)"),
                              ("train.lr=" + "x" * 3000, "train.lr: expected a number, got 'xxxx"),
                              ("x" * 100_000 + ".y=1", "unknown section")):
        result = cli("train-increment", ws.root, override)
        assert result.exit_code == 2, result.output[:2000]
        assert message in result.stderr and len(result.output) < BOUND
        assert "characters" in result.stderr or "levels" in result.stderr  # the value is cut, with its size
    _untouched(ws)


def test_user_values_echoed_in_messages_are_cut_with_their_size(ws, tmp_path):
    long = "v" * 100_000
    for args, message in ((["fill-mask", ws.root, "a [MASK]", "--versions", long], "unknown version 'vvvv"),
                          (["eval", ws.root, "--data", long], "unknown increment 'vvvv"),
                          (["ingest", ws.root, SAMPLES / "pydocs.txt", "--name", "../" + long], "increment name '../vvv"),
                          (["ingest", ws.root, tmp_path / long[:200] / long[:200]], "(missing)")):
        result = cli(*args)
        assert result.exit_code == 2, result.output[:2000]
        line = assert_one_error_line(result.stderr, message)
        assert len(result.output) < BOUND and ("characters)" in line or "(missing)" in line), line
    ws.latest_path.write_bytes(b"\xff" * 2_000_000)  # a LATEST that is no version name, not UTF-8 either
    result = cli("status", ws.root)
    assert result.exit_code == 2 and len(result.output) < BOUND
    assert_one_error_line(result.stderr, "LATEST: names", "characters)", "which is not a version here")


def test_paths_that_look_like_markup_are_printed_as_they_are(ws, tmp_path):
    """A path like `[/bold]x` once crashed the warning line (rich markup); `[x]` vanished from it."""
    (tmp_path / "[x]").mkdir()
    good = tmp_path / "[x]" / "notes.txt"
    good.write_text("a few words about emma woodhouse\n")
    result = cli("ingest", ws.root, good, tmp_path / "[/bold]nope")
    assert result.exit_code == 0, result.output
    assert f"{tmp_path}/[/bold]nope (missing)" in result.stderr and "[x]/notes.txt" not in result.stderr
    assert f"skipped files: missing  1 ({tmp_path}/[/bold]nope)" in result.stdout


def test_a_workspace_or_output_path_that_cannot_be_used_exits_2(ws, tmp_path):
    """A name over the file system's 255 bytes (ENAMETOOLONG) was exit 1 for every command."""
    long = tmp_path / ("x" * 300)
    for args, message in ((["status", long], "cannot be used as a workspace (File name too long)"),
                          (["verify", long], "cannot be used as a workspace (File name too long)"),
                          (["init", long, "--base", "scratch:tiny"], "cannot be used as a workspace (File name too long)"),
                          (["fill-mask", long, "a [MASK]"], "cannot be used as a workspace (File name too long)"),
                          (["eval", ws.root, "--plot", long], "--plot cannot be written (File name too long)"),
                          (["eval", ws.root, "--out", tmp_path], f"--out {tmp_path}: is a folder; name a file")):
        result = cli(*args)
        assert result.exit_code == 2, result.output[:2000]
        assert_one_error_line(result.stderr, message)
    assert not list(tmp_path.glob(".*.tmp"))
    _untouched(ws)
