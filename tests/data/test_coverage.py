"""The unknown-token guard: ingest measures, records, warns about and refuses text the tokenizer
cannot represent; [UNK] is never a target; nothing without a target or a score is ever promoted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.config.recipe import load_recipe
from incr_cli.data.coverage import Coverage
from incr_cli.data.packing import tokenize_with_offsets
from incr_cli.model.weights import init_workspace, load_tokenizer, scratch_tokenizer
from incr_cli.store.workspace import Workspace
from incr_cli.training.masking import tokenizer_inputs
from tests.helpers_train import REPO, SAMPLES, reset_faults, write_increment

sys.path.insert(0, str(REPO / "scripts"))
from make_zh_base import write_zh_base  # noqa: E402

runner = CliRunner()
CHINESE = SAMPLES / "chinese.txt"


def _measure(tokenizer, texts: list[str]) -> Coverage:
    coverage = Coverage(tokenizer.unk_token_id)
    ids, offsets = tokenize_with_offsets(tokenizer, texts)
    coverage.add(texts, ids, offsets)
    return coverage


def test_coverage_counts_unknown_tokens_and_dropped_characters():
    tok = scratch_tokenizer()
    clean = _measure(tok, ["the house was quiet", "she said no"])
    assert clean.unknown == 0 and clean.dropped == 0 and clean.chars == len("thehousewasquiet") + len("shesaidno")
    mixed = _measure(tok, ["the 要有礼貌 house"])
    assert mixed.unknown > 0 and mixed.example and "要" in mixed.example
    assert 0 < mixed.unknown_share < 1
    dropped = _measure(tok, ["the \u0300\u0301 house"])  # combining marks alone: BERT's normaliser keeps no token
    assert dropped.dropped_share >= 0 and dropped.chars > 0


def test_unknown_token_is_never_a_target():
    tok = scratch_tokenizer()
    assert tok.unk_token_id in tokenizer_inputs(tok, load_recipe(REPO / "recipes" / "cpu-tiny.yaml")).special_ids.tolist()


def test_chinese_into_an_english_line_is_refused_with_its_share(tiny_workspace: Workspace):
    result = runner.invoke(app, ["ingest", str(tiny_workspace.root), str(CHINESE)])
    assert result.exit_code == 2
    assert "d0001-chinese" in result.output and "unknown ([UNK])" in result.output and "--allow-unknown" in result.output
    assert tiny_workspace.increments() == []  # nothing half-written

    allowed = runner.invoke(app, ["ingest", str(tiny_workspace.root), str(CHINESE), "--allow-unknown", "--json"])
    assert allowed.exit_code == 0, allowed.output
    share = json.loads(allowed.stdout)["unknown"]["unknown_share"]
    assert share > 0.2
    manifest = tiny_workspace.increment_manifest("d0001-chinese")
    assert manifest["unknown"]["unknown_share"] == share
    status = json.loads(runner.invoke(app, ["status", str(tiny_workspace.root), "--json"]).stdout)
    assert status["increments"][0]["unknown"]["unknown_share"] == share


def test_a_little_unknown_text_warns_naming_the_increment(tiny_workspace: Workspace, tmp_path: Path):
    english = (SAMPLES / "fortunes.txt").read_text(encoding="utf-8").splitlines()[:200]
    path = tmp_path / "mostly-english.txt"
    path.write_text("\n".join([*english, "礼貌 is polite"]) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["ingest", str(tiny_workspace.root), str(path), "data.unknown_warn=0.0001"])
    assert result.exit_code == 0, result.output
    assert "d0001-mostly-english" in result.output and "礼貌" in result.output


def test_chinese_into_a_chinese_capable_line_is_accepted(tmp_path: Path):
    base = write_zh_base(tmp_path / "zh-base", CHINESE.read_text(encoding="utf-8"))
    root = tmp_path / "ws"
    init_workspace(root, str(base), load_recipe(REPO / "recipes" / "cpu-tiny.yaml"))
    result = runner.invoke(app, ["ingest", str(root), str(CHINESE), "--json"])
    assert result.exit_code == 0, result.output
    unknown = json.loads(result.stdout)["unknown"]
    assert unknown["unknown_share"] < 0.01 and unknown["dropped_share"] < 0.01


def _unk_rows(ws: Workspace, n: int) -> np.ndarray:
    tok = load_tokenizer(ws, "v0000")
    rows = np.full((n, 16), tok.unk_token_id)
    rows[:, 0] = tok.cls_token_id
    return rows


def _normal_rows(n: int) -> np.ndarray:
    rows = np.random.default_rng(0).integers(10, 3000, size=(n, 16))
    rows[:, 0] = 2
    return rows


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_nothing_to_learn_or_to_score_is_never_promoted(tiny_workspace: Workspace, split):
    """All-[UNK] training rows stop at the first step; all-[UNK] held-out rows leave the gate nothing to compare."""
    ws = tiny_workspace
    train = _unk_rows(ws, 8) if split == "train" else _normal_rows(8)
    heldout = _unk_rows(ws, 4) if split == "heldout" else _normal_rows(4)
    inc = write_increment(ws, "unk", train, heldout, pad_id=0)
    reset_faults()
    result = runner.invoke(app, ["train-increment", str(ws.root), "train.steps=2"])
    assert result.exit_code == 2, result.output
    assert inc in result.output
    assert ws.latest() == "v0000"
