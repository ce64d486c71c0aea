"""Flat cost as history grows: the gate's "before" scores are the parent's recorded "after" scores,
the gate scores a bounded, nested sample of the lineage, and `incr eval` reads training's cells."""

from __future__ import annotations

import json

from incr_cli.config.recipe import load_recipe
from incr_cli.scoring.gate import gate_sample
from tests.helpers_reliability import cli
from tests.helpers_train import tagged_rows, write_increment


def test_the_gate_sample_is_bounded_and_nested_as_the_lineage_grows(tiny_workspace):
    ws = tiny_workspace
    recipe = load_recipe(ws.recipe_path, ["eval.max_sequences=8", "eval.gate_sequences=40"])
    incs = [write_increment(ws, f"n{i}", tagged_rows(i, 2, 16), tagged_rows(100 + i, 8, 16)) for i in range(40)]
    assert gate_sample(ws, recipe, incs[3:4], incs[:3]) == incs[:4]  # 32 rows fit: everything
    previous = set(incs[:5])  # at n = 4, everything fit
    for n in range(5, 40):
        earlier, pending = incs[:n], [incs[n]]
        chosen = gate_sample(ws, recipe, pending, earlier)
        assert chosen[-1] == incs[n] and chosen == sorted(chosen, key=incs.index)
        assert 8 * (len(chosen) - 1) <= 40  # within the budget, the new increment on top
        assert incs[n - 1] in chosen and len(chosen) >= 4  # the newest earlier one, and older ones
        # everything chosen now was scored by the parent's run (its sample, or its new increment)
        assert set(chosen[:-1]) <= previous | {incs[n - 1]}, n
        previous = set(chosen)
    everything = load_recipe(ws.recipe_path, ["eval.max_sequences=8", "eval.gate_sequences=null"])
    assert gate_sample(ws, everything, [incs[39]], incs[:39]) == incs


def test_before_scores_are_the_parents_after_scores_and_eval_reuses_them(two_increments):
    ws = two_increments
    first, second = ws.increments()
    parent = json.loads((ws.version_dir("v0001") / "metrics.json").read_text())
    result = cli("train-increment", ws.root, "train.steps=2", "runtime.num_threads=1", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads((ws.version_dir("v0002") / "metrics.json").read_text())
    sample = metrics["gate_sample"]
    assert sample["before_recorded"] == [first] and sample["before_scored"] == [second]
    assert metrics["eval"]["before"][first] == parent["eval"]["after"][first]  # the same fact, not a rescore
    assert sample["scored"] == [first, second] and sample["skipped"] == []
    scored = json.loads(cli("eval", ws.root, "--versions", "v0001,v0002", "--json").stdout)
    # every cell is a fact training recorded: v0001's "after" (its run) and "before" (v0002's run) cells,
    # v0002's "after" cells; none is scored again
    assert scored["cache"]["misses"] == 0 and scored["cache"]["hits"] == 4
    assert scored["matrix"]["v0002"][first]["perplexity"] == metrics["eval"]["after"][first]["perplexity"]


def test_the_history_benchmark_runs_and_scores_nothing_twice(capsys):
    import sys

    from tests.helpers_train import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_history

    assert bench_history.main(["--sizes", "1,3", "--steps", "1", "--repeats", "1"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3 |")]
    assert len(table) == 1
    cols = [c.strip() for c in table[0].split("|")[1:-1]]
    assert cols[-2] == "0" and float(cols[-1]) > 0  # scored twice: none; the downstream task was scored
    assert "| 1 / 2 |" in table[0]  # before: the new increment scored, the gate's two earlier ones reused
