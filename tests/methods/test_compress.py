"""`incr compress` through the CLI with a tiny model: the student line, its report, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_train import tiny_model
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.methods.compress import build_student, layer_map
from incr_cli.store.workspace import Workspace

runner = CliRunner()


def incr(*args):
    return runner.invoke(app, [*map(str, args)])


def test_layer_map_takes_every_other_layer_like_distilbert():
    assert layer_map(6, 3) == [0, 2, 4] and layer_map(12, 6) == [0, 2, 4, 6, 8, 10]
    assert layer_map(6, 6) == list(range(6)) and layer_map(6, 1) == [0]


def test_student_starts_from_the_teachers_layers():
    teacher = tiny_model().eval()
    same, picked = build_student(teacher, 2)
    assert picked == [0, 1]
    ids = torch.randint(5, 3000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(same(input_ids=ids).logits, teacher(input_ids=ids).logits)
    one, picked = build_student(teacher, 1)
    assert picked == [0] and one.config.num_hidden_layers == 1
    torch.testing.assert_close(one.bert.encoder.layer[0].output.dense.weight, teacher.bert.encoder.layer[0].output.dense.weight)
    narrow, _ = build_student(teacher, 1, hidden=16)  # head size 16: one head of two kept
    assert narrow.config.hidden_size == 16 and narrow.config.num_attention_heads == 1
    assert narrow.config.intermediate_size == 32
    torch.testing.assert_close(narrow.bert.embeddings.word_embeddings.weight,
                               teacher.bert.embeddings.word_embeddings.weight[:, :16])


@pytest.mark.slow
def test_compress_writes_a_new_line_that_takes_increments(two_increments, tmp_path):
    ws = two_increments
    into = tmp_path / "student"
    result = incr("compress", ws.root, "--layers", 1, "--into", into, "train.steps=3", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["teacher"]["layers"] == 2 and doc["student"]["layers"] == 1
    assert doc["student"]["parameters"] < doc["teacher"]["parameters"]
    assert 0 < doc["student"]["weights_bytes"] < doc["teacher"]["weights_bytes"]
    assert doc["student"]["tokens_per_second"] > 0 and doc["speedup"] > 0
    assert doc["loss_terms"] == ["mlm_new", "distill", "hidden"] and doc["steps"] == 3
    assert set(doc["eval"]["student"]) == {"d0001-austen"} == set(doc["eval"]["teacher"])
    assert 0 <= doc["eval"]["student"]["d0001-austen"]["accuracy"] <= 1

    line = Workspace.open(into)
    assert line.versions() == ["v0000"] and line.latest() == "v0000"
    manifest = line.version_manifest("v0000")
    assert manifest["teacher"]["version"] == "v0001" and manifest["trained_on"] == ["d0001-austen"]
    assert json.loads((line.version_dir("v0000") / "metrics.json").read_text())["kind"] == "compression"
    assert not (into.parent / f".{into.name}.tmp").exists() and not list(into.parent.glob(".student.tmp-*"))
    assert incr("verify", into, "--all").exit_code == 0
    assert line.pending("v0000") == ["d0002-fortunes"]  # the line's next increment, as in the teacher's
    nxt = incr("train-increment", into, "train.steps=2")
    assert nxt.exit_code == 0, nxt.output
    assert line.latest() == "v0001" and line.version_manifest("v0001")["parent"] == "v0000"

    shown = incr("compress", ws.root, "--layers", 1, "--hidden", 32, "--into", tmp_path / "narrow", "train.steps=2")
    assert shown.exit_code == 0, shown.output
    assert "parameters" in shown.stdout and "d0001-austen accuracy" in shown.stdout
    narrow = json.loads((tmp_path / "narrow" / "checkpoints" / "v0000" / "metrics.json").read_text())
    assert narrow["student"]["hidden"] == 32 and "hidden" not in narrow["loss_terms"]  # shapes differ


@pytest.mark.parametrize("args, message", [
    (["--layers", "3"], "--layers 3: choose 1 to 2"),
    (["--layers", "1", "--hidden", "48"], "--hidden 48: choose a multiple of the head size 32"),
    (["--layers", "1", "--version", "v0000"], "v0000 has not been trained on any increment"),
    (["--layers", "1", "--version", "v0007"], "unknown version 'v0007'"),
    (["--layers", "1", "EXISTING"], "exists and is not empty"),
    (["--layers", "1", "train.stepz=2"], "train.stepz: unknown key"),
], ids=["too many layers", "bad hidden", "untrained teacher", "unknown version", "into exists", "bad key"])
def test_bad_input_exits_2_and_creates_nothing(two_increments, tmp_path, args, message):
    into = tmp_path / "student"
    if "EXISTING" in args:
        into.mkdir()
        (into / "keep.txt").write_text("mine")
        args = [a for a in args if a != "EXISTING"]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = incr("compress", two_increments.root, *args, "--into", into)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
