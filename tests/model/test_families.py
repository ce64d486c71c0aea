"""Every supported encoder family end to end, as a new user would run it on a local model folder.

A tiny random model of each family (helpers_arch, saved in Hugging Face layout, no download) goes
through init -> ingest -> two increments with distillation and replay -> eval -> fill-mask on the
saved version; one non-BERT family also resumes an interrupted run to the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_arch import FAMILIES, write_family_dir
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.config.recipe import load_recipe
from incr_cli.line.increment import train_increment
from incr_cli.model.heads import head_kind
from incr_cli.model.weights import init_workspace
from incr_cli.scoring.evaluate import EvalGrid, evaluate
from incr_cli.store.workspace import Workspace
from tests.helpers_train import (
    REPO,
    _ingest,
    assert_fill_mask_agrees,
    assert_same_weights,
    excerpt,
    reset_faults,
    weights,
)

# Small enough for a few seconds per family on 2 cores; the recipe's distill.alpha and replay.ratio stay on.
OVERRIDES = ["model.max_seq_len=32", "train.steps=2", "train.batch_size=4", "eval.max_sequences=8",
             "runtime.save_every=1"]
runner = CliRunner()


def _line(tmp_path: Path, family: str) -> tuple[Workspace, list[str]]:
    """A workspace on a tiny ``family`` base with two ingested texts (d0001 trained into v0001)."""
    base = write_family_dir(tmp_path / "base", family)
    root = tmp_path / "ws"
    init_workspace(root, str(base), load_recipe(REPO / "recipes" / "cpu-tiny.yaml", OVERRIDES))
    ws = Workspace.open(root)
    texts = tmp_path / "texts"
    texts.mkdir()
    first = _ingest(ws, excerpt("austen.txt", slice(0, 120), texts), "austen")
    with ws.lock("train-increment"):
        train_increment(ws, load_recipe(ws.recipe_path))
    second = _ingest(ws, excerpt("fortunes.txt", slice(0, 120), texts), "fortunes")
    return ws, [first, second]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_two_increments_evaluates_and_fills_masks(tmp_path, family):
    from transformers import pipeline

    ws, increments = _line(tmp_path, family)
    with ws.lock("train-increment"):
        result = train_increment(ws, load_recipe(ws.recipe_path))
    assert result.promoted and ws.latest() == "v0002"
    assert result.metrics["data"]["replay"] == [increments[0]]  # replay and distillation both ran
    assert any("distill" in k for k in result.metrics["loss"]) and any("replay" in k for k in result.metrics["loss"])
    manifest = ws.version_manifest("v0002")
    assert manifest["attn_implementation"] in ("sdpa", "eager")
    assert result.metrics["head"]["kind"] != "full"  # every family here has a masked-only head
    drift = result.metrics["embedding_drift"]  # the feature extractor (incr embed's code) works on every family
    assert drift["all"]["n"] > 0 and 0 < drift["all"]["mean_cosine"] <= 1

    scores = evaluate(ws, EvalGrid(ws.versions(), increments), load_recipe(ws.recipe_path)).scores
    cells = [c for row in scores.values() for c in row.values()]
    assert cells and all(c["loss"] is not None and c["tokens"] > 0 for c in cells)

    folder = str(ws.version_dir("v0002"))
    fill = pipeline("fill-mask", model=folder, tokenizer=folder, device="cpu")
    assert_fill_mask_agrees(fill, f"It is a truth {fill.tokenizer.mask_token} acknowledged.")  # the model's own top 3


@pytest.mark.slow
def test_a_non_bert_family_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """RoBERTa (byte-level BPE tokenizer, its own head split): SIGTERM after step 1, rerun resumes, same weights."""
    ws, _ = _line(tmp_path, "roberta")
    reference = ws.copy_to(tmp_path / "reference")
    args = ["train-increment", str(ws.root)]
    reset_faults()
    done = runner.invoke(app, ["train-increment", str(reference.root)])
    assert done.exit_code == 0, done.output
    monkeypatch.setenv("INCR_FAULT", "train.step@1:term")
    reset_faults()
    assert runner.invoke(app, args).exit_code == 143
    monkeypatch.delenv("INCR_FAULT")
    reset_faults()
    resumed = runner.invoke(app, [*args, "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from_step"] == 1
    assert_same_weights(weights(ws, "v0002"), weights(reference, "v0002"))


def test_deberta_and_mpnet_fall_back_to_eager_attention(tmp_path):
    """They have no sdpa kernel: `auto` picks eager, an explicit sdpa falls back with one log line."""
    from incr_cli.progress import Quiet

    for family in ("deberta-v2", "mpnet"):
        base = write_family_dir(tmp_path / family, family)
        quiet = Quiet()
        result = init_workspace(tmp_path / f"ws-{family}", str(base),
                                load_recipe(REPO / "recipes" / "cpu-tiny.yaml", ["model.attn_implementation=sdpa"]),
                                reporter=quiet)
        assert result.manifest["attn_implementation"] == "eager"
        assert [m for m in quiet.messages if "does not support sdpa attention; using eager" in m]
    assert head_kind(type("BertForMaskedLMSubclass", (), {})()) == "full"
