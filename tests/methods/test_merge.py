"""Weight averaging with the parent (merge.weight, merge.choose): the arithmetic, the choice on
held-out data, and a real increment whose written weights are that average."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from incr_cli.config.recipe import load_recipe
from incr_cli.errors import RecipeError
from incr_cli.line.increment import train_increment
from incr_cli.methods.merge import candidate_weights, interpolate_, merge_with_parent, objective
from incr_cli.progress import Quiet
from tests.helpers_train import weights


def test_candidate_weights_run_from_one_down_to_the_lowest():
    assert candidate_weights(0.5) == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert candidate_weights(0.75) == [1.0, 0.9, 0.8, 0.75]  # the lowest, off the grid, included
    assert candidate_weights(1.0) == [1.0]


def test_objective_gives_the_new_text_and_the_earlier_lineage_half_each():
    losses = {"new": 2.0, "a": 4.0, "b": 6.0, "c": 8.0}
    assert objective(losses, ["new"]) == pytest.approx(0.5 * 2.0 + 0.5 * 6.0)  # not (2+4+6+8)/4
    assert objective({"new": 2.0, "a": None}, ["new"]) == 2.0
    assert objective({"a": None}, ["new"]) is None


def test_interpolate_averages_and_keeps_a_grown_vocabularys_new_rows():
    model = nn.Embedding(5, 2)
    trained = {"weight": torch.full((5, 2), 3.0)}
    parent = {"weight": torch.full((3, 2), 1.0)}  # the parent had 3 rows
    interpolate_(model, trained, parent, 0.25)
    w = model.weight.detach()
    torch.testing.assert_close(w[:3], torch.full((3, 2), 0.25 * 3 + 0.75 * 1))
    torch.testing.assert_close(w[3:], torch.full((2, 2), 3.0))


def test_choose_keeps_the_weight_with_the_lowest_objective():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    parent = {"weight": torch.zeros(1, 1)}
    # the new text's loss rises as the weight moves to the parent, the earlier text's falls:
    # objective (1 - w) + 0.625 w^2, lowest at w = 0.8
    def losses_now():
        w = float(model.weight.detach())
        return {"new": (1 - w) * 2.0, "old": 1.25 * w * w}

    record = merge_with_parent(model, parent, weight=0.5, choose=True, new=["new"], losses_now=losses_now)
    assert record.chosen and record.weight == 0.8
    assert float(model.weight.detach()) == pytest.approx(record.weight)
    assert set(record.objective) == {f"{w:g}" for w in candidate_weights(0.5)}


def test_a_merged_increment_writes_the_average_of_the_trained_and_the_parent_weights(two_increments, tmp_path):
    plain_ws = two_increments.copy_to(tmp_path / "plain")
    merged_ws = two_increments

    def run(ws, *overrides):
        with ws.lock("train-increment"):
            return train_increment(ws, load_recipe(ws.recipe_path, ["train.steps=4", *overrides]), reporter=Quiet())

    plain = run(plain_ws)
    merged = run(merged_ws, "merge.weight=0.25")
    parent, trained, written = weights(merged_ws, "v0001"), weights(plain_ws, plain.version), weights(
        merged_ws, merged.version)
    assert written.keys() == trained.keys()
    moved = 0
    for name in written:
        torch.testing.assert_close(written[name], 0.25 * trained[name] + 0.75 * parent[name], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(trained[name], parent[name]))
    assert moved > 0  # training changed something, so the average is not the trained weights
    assert merged.metrics["merge"]["weight"] == 0.25 and not merged.metrics["merge"]["chosen"]
    assert plain.metrics["merge"] is None


def test_merge_choose_records_every_candidate_and_scores_rows_past_the_eval_sample(two_increments):
    ws = two_increments
    with ws.lock("train-increment"):
        result = train_increment(ws, load_recipe(ws.recipe_path, [
            "train.steps=4", "merge.weight=0.8", "merge.choose=true", "eval.max_sequences=2", "merge.sequences=2"]),
            reporter=Quiet())
    record = result.metrics["merge"]
    assert record["chosen"] and set(record["objective"]) == {"1", "0.9", "0.8"}
    scored = {w: v for w, v in record["objective"].items() if v is not None}
    assert record["weight"] == float(min(scored, key=scored.get))
    assert set(record["losses"]["1"]) == set(result.metrics["eval"]["after"])  # the gate's increments
    assert "past the eval sample" in record["selected_on"]


@pytest.mark.parametrize("override, message", [
    ("merge.weight=0", "merge.weight: 0.0 is out of range"),
    ("merge.wieght=0.5", "did you mean"),
    ("replay.split=recency", "replay.split: 'recency' is not one of size, increment"),
    ("train.schedule=wsd2", "did you mean"),
    ("train.decay_ratio=0", "out of range"),
])
def test_new_keys_are_validated(tiny_recipe_path, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(tiny_recipe_path, [override])
