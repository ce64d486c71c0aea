"""`incr eval` end to end through the CLI: tables, JSON, the kept copy, the plot, and bad arguments."""

from __future__ import annotations

import json
import sys

import helpers_eval
from helpers_eval import add_version, lines, tree_state
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.scoring import render as eval_report
from incr_cli.scoring.evaluate import EvalGrid, evaluate

eval_recipe, _three_template, three = helpers_eval.eval_recipe, helpers_eval._three_template, helpers_eval.three
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["eval", *map(str, args)])


def test_tables_mark_trained_cells_and_a_copy_is_kept(three):
    ws, (d1, d2) = three
    before = tree_state(ws.checkpoints)
    result = run(ws.root)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "perplexity (lower is better); * = trained on" in out
    assert "masked-token accuracy" in out and "continual-learning summaries over v0000 -> v0001 -> v0002" in out
    row = next(line for line in out.splitlines() if line.startswith("v0001"))
    assert row.split()[1].endswith("*") and not row.split()[2].endswith("*")  # v0001 learned d1, not d2
    assert "v0002 (LATEST)" in out
    copies = list(ws.eval_dir.glob("*.json"))
    assert len(copies) == 1 and json.loads(copies[0].read_text())["kind"] == "eval"
    assert tree_state(ws.checkpoints) == before


def test_json_out_and_cached_rerun(three, tmp_path):
    ws, (d1, d2) = three
    first = run(ws.root, "--json", "--out", tmp_path / "r.json", "--versions", "all", "--data", "d0001")
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert doc == json.loads((tmp_path / "r.json").read_text())
    assert [c["id"] for c in doc["columns"]] == [d1]
    assert set(doc["matrix"]) == {"v0000", "v0001", "v0002"}
    assert doc["cache"] == {"hits": 0, "misses": 3}
    again = json.loads(run(ws.root, "--json", "--versions", "all", "--data", "d0001").stdout)
    assert again["cache"] == {"hits": 3, "misses": 0} and again["matrix"] == doc["matrix"]
    assert again["summaries"] == doc["summaries"]


def test_plot_is_a_png(three, tmp_path):
    ws, _ = three
    png = tmp_path / "eval.png"
    result = run(ws.root, "--plot", png, "--versions", "v0000,v0002")
    assert result.exit_code == 0, result.output
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_plot_without_matplotlib_names_the_extra(three, tmp_path, monkeypatch):
    ws, _ = three
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = run(ws.root, "--plot", tmp_path / "eval.png")
    assert result.exit_code == 2
    assert "pip install 'incr-cli[plot]'" in result.stderr
    assert not (tmp_path / "eval.png").exists() and not ws.eval_dir.exists()  # refused before scoring


def test_bad_arguments_exit_2_with_the_valid_names(three, tmp_path):
    ws, (d1, d2) = three
    result = run(ws.root, "--versions", "v0007")
    assert result.exit_code == 2 and "valid versions: v0000, v0001, v0002" in result.stderr
    result = run(ws.root, "--data", "d0009")
    assert result.exit_code == 2 and f"valid increments: {d1}, {d2}" in result.stderr
    result = run(tmp_path / "nowhere")
    assert result.exit_code == 2 and "no such workspace" in result.stderr
    result = run(ws.root, "--out", tmp_path / "missing" / "r.json")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    result = run(ws.root, "eval.max_sequences=0")
    assert result.exit_code == 2 and "eval.max_sequences" in result.stderr


def test_text_files_and_overrides(three, tmp_path):
    ws, incs = three
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(lines("pydocs.txt", 20)) + "\n", encoding="utf-8")
    result = run(ws.root, "--text", text, "--json", "--versions", "latest", "eval.max_sequences=4")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [c["id"] for c in doc["columns"]] == ["text:notes.txt"]  # --text alone: only the text
    assert doc["settings"]["max_sequences"] == 4
    assert doc["matrix"]["v0002"]["text:notes.txt"]["tokens"] > 0
    assert ws.increments() == incs


def test_matrix_table_labels_rejected_versions_and_new_cells(three, eval_recipe):
    ws, (d1, d2) = three
    add_version(ws, "v0003", "v0002", [], seed=3, recipe=eval_recipe, status="rejected")
    result = evaluate(ws, EvalGrid(["v0001", "v0002", "v0003"], [d1, d2]), eval_recipe)
    title, columns, rows = eval_report.matrix_table(result, "perplexity")
    assert columns == ["version", d1, d2]
    assert rows[0][1].startswith("[bold]") and rows[0][1].endswith("*[/bold]")  # v0001 trained d1 itself
    assert rows[1][1].endswith("*") and not rows[1][1].startswith("[bold]")  # v0002 inherited d1
    assert rows[2][0] == "v0003 (rejected)" and rows[1][0] == "v0002 (LATEST)"
    assert eval_report.fmt("accuracy", 0.1234) == "12.3%" and eval_report.fmt("perplexity", None) == "-"
