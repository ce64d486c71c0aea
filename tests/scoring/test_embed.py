"""`incr embed` through the CLI, and the drift statistics as pure functions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.scoring.embed import embedding_drift

runner = CliRunner()
LINES = ["Elizabeth walked to the house.", "The function returns a value.",
         "It is a truth universally acknowledged.", "Import the module first."]


def embed(*args):
    return runner.invoke(app, ["embed", *map(str, args)])


@pytest.fixture
def texts(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(LINES[:3]) + "\n\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"body": LINES[3]}) + "\n", encoding="utf-8")
    one = tmp_path / "one.txt"
    one.write_text(LINES[1] + "\n", encoding="utf-8")
    return txt, jsonl, one


def test_rows_follow_the_inputs_and_are_unit_vectors(tiny_workspace, texts, tmp_path):
    txt, jsonl, one = texts
    out = tmp_path / "e.npy"
    result = embed(tiny_workspace.root, txt, one, "--out", out, "--json", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["rows"] == 4 and doc["dim"] == 64 and doc["version"] == "v0000" and doc["pooling"] == "mean"
    assert [(f["first_row"], f["rows"]) for f in doc["files"]] == [(0, 3), (3, 1)]
    rows = np.load(out)
    assert rows.shape == (4, 64) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    # the same text alone (no padding, another batch) gives the same row: order and padding are right
    np.testing.assert_allclose(rows[3], rows[1], atol=1e-5)
    assert not np.allclose(rows[0], rows[1])

    jl = tmp_path / "j.npy"
    result = embed(tiny_workspace.root, jsonl, "--text-field", "body", "--pooling", "cls", "--out", jl)
    assert result.exit_code == 0, result.output
    assert "1 embeddings of size 64 (cls pooling, v0000)" in result.stdout
    assert np.load(jl).shape == (1, 64)


@pytest.mark.parametrize("args, message", [
    (["missing.txt"], "nothing to embed in missing.txt (missing: 1)"),
    (["TXT", "--pooling", "max"], "--pooling max: use one of mean, cls"),
    (["TXT", "--version", "v0009"], "unknown version 'v0009'"),
    (["TXT", "--out", "e.txt"], "name a .npy file"),
    (["TXT", "--out", "nowhere/e.npy"], "the folder"),
    (["TXT", "--format", "jsonl"], "malformed_json: 3"),
    (["JSONL"], "missing_field: 1"),
], ids=["missing input", "unknown pooling", "unknown version", "not npy", "no folder", "wrong format",
        "wrong text field"])
def test_bad_input_exits_2_and_writes_nothing(tiny_workspace, texts, tmp_path, monkeypatch, args, message):
    txt, jsonl, _ = texts
    monkeypatch.chdir(tmp_path)
    args = [{"TXT": str(txt), "JSONL": str(jsonl)}.get(a, a) for a in args]
    if "--out" not in args:
        args += ["--out", "e.npy"]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = embed(tiny_workspace.root, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_not_a_workspace_exits_2(tmp_path, texts):
    result = embed(tmp_path / "nope", texts[0], "--out", tmp_path / "e.npy")
    assert result.exit_code == 2 and "no such workspace" in result.stderr


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_drift_statistics():
    rng = np.random.default_rng(0)
    a = _unit(rng.standard_normal((40, 16)))
    same = embedding_drift(a, a.copy())
    assert same["mean_cosine"] == pytest.approx(1.0) and same["neighbour_overlap"] == 1.0 and same["k"] == 10
    # a rotation moves every vector but keeps every neighbour
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    rotated = embedding_drift(a, a @ q)
    assert rotated["mean_cosine"] < 0.5 and rotated["neighbour_overlap"] == 1.0
    # noise moves both
    noisy = embedding_drift(a, _unit(a + 0.1 * rng.standard_normal(a.shape)))
    assert 0.5 < noisy["mean_cosine"] < 0.99 and noisy["neighbour_overlap"] < 1.0
    small = embedding_drift(a[:3], a[:3])
    assert small["k"] == 2 and small["neighbour_overlap"] == 1.0
    assert embedding_drift(a[:1], a[:1])["neighbour_overlap"] is None
    assert embedding_drift(a[:0], a[:0])["mean_cosine"] is None
