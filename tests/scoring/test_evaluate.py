"""Held-out scoring, the version x increment matrix, its cache, and what eval must never touch."""

from __future__ import annotations

import dataclasses
import json
import math

import helpers_eval
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_eval import add_version, lines, tree_state

from incr_cli.config.recipe import build_recipe, recipe_to_dict
from incr_cli.errors import IntegrityError, UsageError
from incr_cli.model import weights as models
from incr_cli.model.heads import MaskedLMHead
from incr_cli.runtime.device import Placement
from incr_cli.scoring import evaluate as ev
from incr_cli.scoring import score
from incr_cli.scoring.render import summary_table
from incr_cli.scoring.score import HeldOut

# Shared fixtures of the eval tests (a three-version workspace built once per session).
eval_recipe, _three_template, three = helpers_eval.eval_recipe, helpers_eval._three_template, helpers_eval.three


def _recipe(base, **overrides):
    data = recipe_to_dict(base)
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return build_recipe(data)


def _head_and_inputs(ws, version, recipe):
    model, tokenizer = models.load_version(ws, version)
    return MaskedLMHead(model), ev.tokenizer_inputs(tokenizer, recipe)


# ----------------------------------------------------------------------------- scoring


def test_masks_depend_on_the_key_only(three, eval_recipe):
    ws, (d1, d2) = three
    ids = torch.from_numpy(ev.read_heldout(ws, d1).astype(np.int64))
    _, inputs = _head_and_inputs(ws, "v0000", eval_recipe)
    a = score.eval_masks(ids, key=d1, recipe=eval_recipe, tokens=inputs)
    b = score.eval_masks(ids, key=d1, recipe=eval_recipe, tokens=inputs)
    c = score.eval_masks(ids, key=d2, recipe=eval_recipe, tokens=inputs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert a[1].any(dim=1).all()  # every row with text is scored
    assert not (a[1] & torch.isin(ids, inputs.special_ids)).any()  # specials never masked


def test_score_equals_the_full_model_cross_entropy(three, eval_recipe):
    """loss = summed CE over masked tokens / their count, from the unsplit model; ppl = exp(loss)."""
    ws, (d1, _) = three
    head, inputs = _head_and_inputs(ws, "v0001", eval_recipe)
    ids = ev.read_heldout(ws, d1)
    got = ev.score_sequences(head, HeldOut(d1, ids), recipe=eval_recipe, tokens=inputs)

    rows = torch.from_numpy(np.asarray(ids[: eval_recipe.eval.max_sequences]).astype(np.int64))
    masked, positions = score.eval_masks(rows, key=d1, recipe=eval_recipe, tokens=inputs)
    with torch.no_grad():
        logits = head.model(input_ids=masked, attention_mask=rows != inputs.pad_id).logits[positions]
    targets = rows[positions]
    want = F.cross_entropy(logits, targets).item()
    assert got["tokens"] == int(positions.sum())
    assert got["loss"] == pytest.approx(want, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-4)
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    top5 = (logits.topk(5, dim=-1).indices == targets[:, None]).any(-1).float().mean().item()
    assert got["top5"] == pytest.approx(top5)
    assert 0 <= got["accuracy"] <= got["top5"] <= 1


def test_scores_do_not_depend_on_batch_size_and_restore_training_mode(three, eval_recipe):
    ws, (d1, _) = three
    head, inputs = _head_and_inputs(ws, "v0001", eval_recipe)
    head.train()
    ids = ev.read_heldout(ws, d1)
    results = [ev.score_sequences(head, HeldOut(d1, ids), recipe=_recipe(eval_recipe, eval__batch_size=b),
                                  tokens=inputs) for b in (3, 64)]
    assert head.training  # eval mode only for the duration
    assert results[0]["tokens"] == results[1]["tokens"]
    assert results[0]["accuracy"] == results[1]["accuracy"]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)


def test_max_sequences_and_empty_input(three, eval_recipe):
    ws, (d1, _) = three
    head, inputs = _head_and_inputs(ws, "v0000", eval_recipe)
    ids = ev.read_heldout(ws, d1)
    few = ev.score_sequences(head, HeldOut(d1, ids), recipe=_recipe(eval_recipe, eval__max_sequences=2),
                             tokens=inputs)
    full = ev.score_sequences(head, HeldOut(d1, ids), recipe=eval_recipe, tokens=inputs)
    assert 0 < few["tokens"] < full["tokens"]
    empty = ev.score_sequences(head, HeldOut(d1, ids[:0]), recipe=eval_recipe, tokens=inputs)
    assert empty == {"loss": None, "perplexity": None, "accuracy": None, "top5": None, "tokens": 0, "coverage": None}


def test_bf16_autocast_path_runs_and_stays_close(three, eval_recipe):
    ws, (d1, _) = three
    head, inputs = _head_and_inputs(ws, "v0001", eval_recipe)
    ids = ev.read_heldout(ws, d1)
    fp32 = score.score_increment(head, ws, d1, eval_recipe, models.load_tokenizer(ws, "v0001"))
    bf16 = ev.score_sequences(head, HeldOut(d1, ids), recipe=eval_recipe, tokens=inputs,
                              place=Placement(torch.device("cpu"), "bf16"))
    assert bf16["tokens"] == fp32["tokens"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)


# ----------------------------------------------------------------------------- the matrix and its cache


def test_matrix_of_three_versions_with_lineage_summaries(three, eval_recipe):
    ws, (d1, d2) = three
    result = ev.evaluate(ws, ev.EvalGrid(ev.select_versions(ws, None), ev.select_increments(ws, None)), eval_recipe)
    assert [v.version for v in result.versions] == ["v0000", "v0001", "v0002"]
    assert [c.id for c in result.columns] == [d1, d2]
    assert result.lineage == ["v0000", "v0001", "v0002"] and result.latest == "v0002"
    assert result.learned_by == {d1: "v0001", d2: "v0002"}
    for v in ("v0000", "v0001", "v0002"):
        for d in (d1, d2):
            cell = result.scores[v][d]
            assert cell["tokens"] > 0 and math.isfinite(cell["loss"])
            assert cell["perplexity"] == pytest.approx(math.exp(cell["loss"]))
    # every version is scored on the same masked tokens
    assert len({result.scores[v][d1]["tokens"] for v in ("v0000", "v0001", "v0002")}) == 1
    ppl = result.summaries["perplexity"]
    final = [result.scores["v0002"][d]["perplexity"] for d in (d1, d2)]
    assert ppl.final_average == pytest.approx(sum(final) / 2)
    assert ppl.backward[0] == pytest.approx(-(final[0] - result.scores["v0001"][d1]["perplexity"]))
    # v0000 is scratch:tiny, its MLM head random: no reference for forward transfer, and said so
    assert ws.version_manifest("v0000")["head_initialised"] is True
    assert ppl.forward[1] is None and ppl.fwt is None and "initialised at random" in ppl.fwt_note
    assert "FWT n/a" in summary_table(result)[0] and summary_table(result)[2][0][4] == "n/a*"
    assert result.cache_misses == 6 and result.cache_hits == 0
    doc = result.to_json()
    json.dumps(doc, allow_nan=False)  # standard JSON
    assert doc["summaries"]["accuracy"]["final_average"] == result.summaries["accuracy"].final_average


def test_second_run_comes_from_the_cache_and_loads_nothing(three, eval_recipe, monkeypatch):
    ws, incs = three
    versions = ev.select_versions(ws, "all")
    first = ev.evaluate(ws, ev.EvalGrid(versions, incs), eval_recipe)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached eval must not load a model")

    monkeypatch.setattr(models, "load_version", refuse)
    second = ev.evaluate(ws, ev.EvalGrid(versions, incs), eval_recipe)
    assert second.scores == first.scores
    assert (second.cache_hits, second.cache_misses) == (6, 0)
    assert second.summaries == first.summaries


def test_an_unreadable_cache_file_is_a_miss(three, eval_recipe):
    ws, (d1, _) = three
    first = ev.evaluate(ws, ev.EvalGrid(["v0001"], [d1]), eval_recipe)
    (cell,) = (ws.eval_dir / "cache").glob("*.json")
    cell.write_text("{not json")
    again = ev.evaluate(ws, ev.EvalGrid(["v0001"], [d1]), eval_recipe)
    assert (again.cache_hits, again.cache_misses) == (0, 1) and again.scores == first.scores
    assert json.loads(cell.read_text())["scores"] == first.scores["v0001"][d1]  # rewritten whole


def test_a_new_version_costs_only_its_row(three, eval_recipe, monkeypatch):
    ws, incs = three
    ev.evaluate(ws, ev.EvalGrid(ev.select_versions(ws, "all"), incs), eval_recipe)
    add_version(ws, "v0003", "v0002", [], seed=3, recipe=eval_recipe, status="rejected")
    loaded = []
    real = models.load_version
    monkeypatch.setattr(models, "load_version", lambda ws_, v, **kw: loaded.append(v) or real(ws_, v, **kw))
    result = ev.evaluate(ws, ev.EvalGrid(ev.select_versions(ws, "all"), incs), eval_recipe)
    assert loaded == ["v0003"]
    assert (result.cache_hits, result.cache_misses) == (6, 2)
    assert result.lineage == ["v0000", "v0001", "v0002"]  # summaries follow LATEST, not the rejected one
    assert "v0003" not in ev.select_versions(ws, None)  # default: base and promoted versions


def test_settings_that_change_scores_change_the_cache_key(three, eval_recipe):
    ws, incs = three
    ev.evaluate(ws, ev.EvalGrid(["v0001"], incs), eval_recipe)
    for changed in (_recipe(eval_recipe, eval__seed=7), _recipe(eval_recipe, masking__probability=0.3),
                    _recipe(eval_recipe, eval__max_sequences=4), _recipe(eval_recipe, masking__whole_word=True)):
        assert ev.evaluate(ws, ev.EvalGrid(["v0001"], incs), changed).cache_hits == 0
    # batch size is not a scoring setting
    assert ev.evaluate(ws, ev.EvalGrid(["v0001"], incs), _recipe(eval_recipe, eval__batch_size=5)).cache_misses == 0
    # use_cache=False scores again
    assert ev.evaluate(ws, ev.EvalGrid(["v0001"], incs), eval_recipe, use_cache=False).cache_hits == 0


def test_eval_never_modifies_version_or_data_folders(three, eval_recipe, tmp_path):
    ws, incs = three
    before = (tree_state(ws.checkpoints), tree_state(ws.data))
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(lines("pydocs.txt", 30)) + "\n", encoding="utf-8")
    result = ev.evaluate(ws, ev.EvalGrid(ev.select_versions(ws, "all"), incs, [text]), eval_recipe)
    ev.save_result(ws, result)
    assert (tree_state(ws.checkpoints), tree_state(ws.data)) == before
    assert ws.increments() == incs  # the ad-hoc text was not ingested


def test_text_column_is_scored_like_an_increment(three, eval_recipe, tmp_path):
    ws, incs = three
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(lines("pydocs.txt", 30)) + "\n", encoding="utf-8")
    result = ev.evaluate(ws, ev.EvalGrid(["v0001", "v0002"], [], [str(text)]), eval_recipe)
    assert [c.id for c in result.columns] == ["text:notes.txt"]
    again = ev.evaluate(ws, ev.EvalGrid(["v0001", "v0002"], [], [str(text)]), eval_recipe)
    assert again.scores == result.scores and result.scores["v0001"]["text:notes.txt"]["tokens"] > 0
    assert result.summaries["perplexity"].final_average is None  # text columns are not increments
    with pytest.raises(UsageError, match="nothing to score"):
        ev.evaluate(ws, ev.EvalGrid(["v0001"], [], [tmp_path / "missing.txt"]), eval_recipe)


def test_selection_errors_list_the_valid_names(three, eval_recipe):
    ws, (d1, d2) = three
    with pytest.raises(UsageError, match="valid versions: v0000, v0001, v0002"):
        ev.select_versions(ws, "v0001,v0009")
    with pytest.raises(UsageError, match=f"valid increments: {d1}, {d2}"):
        ev.select_increments(ws, "d0007")
    assert ev.select_versions(ws, "2,0") == ["v0000", "v0002"]
    assert ev.select_versions(ws, "latest") == ["v0002"]
    assert ev.select_increments(ws, "d0002") == [d2]


def test_altered_heldout_is_refused_when_scored(three, eval_recipe):
    ws, (d1, _) = three
    path = ws.increment_dir(d1) / "heldout.bin"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="heldout.bin"):
        ev.evaluate(ws, ev.EvalGrid(["v0000"], [d1]), eval_recipe)


def test_save_result_keeps_a_copy_and_writes_out(three, eval_recipe, tmp_path):
    ws, incs = three
    result = ev.evaluate(ws, ev.EvalGrid(["v0000", "v0001"], incs), eval_recipe)
    first = ev.save_result(ws, result, tmp_path / "out.json")
    second = ev.save_result(ws, result)
    assert first != second and first.parent == second.parent == ws.eval_dir
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc == json.loads(first.read_text())
    assert doc["kind"] == "eval" and doc["settings"]["max_sequences"] == eval_recipe.eval.max_sequences
    assert set(doc["matrix"]) == {"v0000", "v0001"}
    assert doc["versions"][1] == dataclasses.asdict(result.versions[1])


def test_eval_agrees_with_train_increment_before_and_after(tiny_workspace, eval_recipe, tmp_path):
    """The scores train-increment records (through score_sequences) are the matrix cells of incr eval."""
    from incr_cli.data.ingest import IngestOptions, ingest
    from incr_cli.line.increment import train_increment

    ws = tiny_workspace
    recipe = _recipe(eval_recipe, train__steps=2)
    text = tmp_path / "austen.txt"
    text.write_text("\n".join(lines("austen.txt", 120)) + "\n", encoding="utf-8")
    with ws.lock("test"):
        inc = ingest(ws, [str(text)], recipe=recipe, options=IngestOptions(name="austen")).increment
        trained = train_increment(ws, recipe)
    metrics = json.loads((ws.version_dir(trained.version) / "metrics.json").read_text())
    result = ev.evaluate(ws, ev.EvalGrid(["v0000", trained.version], [inc]), recipe)
    for when, version in (("before", "v0000"), ("after", trained.version)):
        for key in ("loss", "perplexity", "accuracy"):
            assert metrics["eval"][when][inc][key] == pytest.approx(result.scores[version][inc][key], rel=1e-6)
