"""Vocabulary growth (issue 15): choosing the words at ingest, tokenizer revisions that only grow,
training a grown student, and scores that stay comparable across vocabularies.

Tiny models of the BERT (WordPiece), RoBERTa (byte-level BPE) and XLM-R (Unigram) families, built
from a config and a small tokenizer (tests/helpers_arch.py); text from the shipped samples.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from helpers_arch import write_family_dir
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.config.recipe import VocabConfig, load_recipe
from incr_cli.data.ingest import IngestOptions, ingest
from incr_cli.errors import InputError, UsageError
from incr_cli.model import vocab
from incr_cli.model.weights import init_workspace, load_tokenizer, tokenizer_sha256
from incr_cli.store.workspace import Workspace
from tests.helpers_train import REPO, excerpt

runner = CliRunner()
FAMILIES = ["bert", "roberta", "xlm-roberta"]  # WordPiece, byte-level BPE, Unigram
TINY = ["model.max_seq_len=32", "train.steps=2", "train.batch_size=4", "eval.max_sequences=8",
        "drift.max_sequences=4", "runtime.num_threads=1"]


def _workspace(tmp_path: Path, family: str) -> Workspace:
    root = tmp_path / f"ws-{family}"
    if family == "bert":
        base = "scratch:tiny"
    else:
        base = str(write_family_dir(tmp_path / f"base-{family}", family))
    init_workspace(root, base, load_recipe(REPO / "recipes" / "cpu-tiny.yaml", TINY))
    return Workspace.open(root)


def _pydocs(tmp_path: Path, lines: slice = slice(0, 300)) -> Path:
    folder = tmp_path / "texts"
    folder.mkdir(exist_ok=True)
    return excerpt("pydocs.txt", lines, folder)


def _ingest(ws: Workspace, path: Path, tokenizer=None, **options):
    with ws.lock("ingest"):
        return ingest(ws, [str(path)], recipe=load_recipe(ws.recipe_path), options=IngestOptions(**options),
                      tokenizer=tokenizer)


# ----------------------------------------------------------------------------- 1. choosing the words


def test_candidates_are_frequent_words_the_tokenizer_cuts_and_not_in_the_vocabulary():
    from incr_cli.model.weights import scratch_tokenizer

    tok = scratch_tokenizer()
    counts = vocab.WordCounts()
    for text in ["numpy numpy numpy the the the policy policy", "numpy xyzzyq", "policy the numpy"]:
        counts.add(tok, text, heldout=False)
    counts.add(tok, "zzzqqq " * 50, heldout=True)  # held-out text never chooses a token
    found = vocab.candidates(counts, tok, VocabConfig(min_frequency=2, min_pieces=2))
    words = [c.token for c in found]
    assert words == ["numpy", "policy"]  # by frequency (5, 3); "the" is one token; xyzzyq occurs once
    assert found[0].frequency == 5 and found[0].pieces == ["num", "##p", "##y"]
    assert found[0].piece_ids == [tok.convert_tokens_to_ids(p) for p in found[0].pieces]
    assert vocab.candidates(counts, tok, VocabConfig(min_frequency=2, min_pieces=3))[0].token == "numpy"
    assert [c.token for c in vocab.candidates(counts, tok, VocabConfig(min_frequency=2, min_pieces=4))] == []


def test_dry_run_lists_the_words_and_writes_nothing(tmp_path):
    ws = _workspace(tmp_path, "bert")
    path = _pydocs(tmp_path)
    result = runner.invoke(app, ["ingest", str(ws.root), str(path), "--extend-vocab", "5", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run: 5 of" in result.output and "policy" in result.output and "polic ##y" in result.output
    assert ws.increments() == [] and not list(ws.staging.glob("tmp-*"))
    with sqlite3.connect(ws.index_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0] == 0  # the index rolled back
    as_json = runner.invoke(app, ["ingest", str(ws.root), str(path), "--extend-vocab", "5", "--dry-run", "--json"])
    report = json.loads(as_json.stdout)["vocab"]
    assert report["requested"] == 5 and len(report["added"]) == 5 and report["candidates"] >= 5
    assert report["added"][0]["frequency"] >= report["added"][-1]["frequency"]
    plain = runner.invoke(app, ["ingest", str(ws.root), str(path), "--dry-run"])
    assert plain.exit_code == 2 and "--extend-vocab" in plain.output and ws.increments() == []


@pytest.mark.parametrize("family", FAMILIES)
def test_an_extending_ingest_stores_a_revision_that_only_grows(tmp_path, family):
    ws = _workspace(tmp_path, family)
    old = load_tokenizer(ws, "v0000")
    result = _ingest(ws, _pydocs(tmp_path), extend_vocab=6)
    inc = result.increment
    manifest = ws.verify_increment(inc)  # the stored tokenizer is sealed with the shards
    grown = vocab.load_revision(ws, inc)
    report = manifest["vocab"]
    assert len(grown) == len(old) + 6 == report["size"] and report["base_size"] == len(old)
    assert all(grown.get_vocab()[t] == i for t, i in old.get_vocab().items())  # no existing id moved
    assert [a["id"] for a in report["added"]] == list(range(len(old), len(old) + 6))
    assert manifest["tokenizer_sha256"] == tokenizer_sha256(grown) == report["sha256"] != tokenizer_sha256(old)
    assert manifest["tokenizer_lineage"] == report["lineage"] == [tokenizer_sha256(old), report["sha256"]]
    assert manifest["vocab_size"] == len(grown)
    for added in report["added"]:  # each word is now one token, the new id
        assert len(added["pieces"]) >= 2
        word = vocab.surface(added["token"])
        text = f"a {word}" if added["token"] != word else word  # a word-start marker: after a space
        ids = grown(text, add_special_tokens=False)["input_ids"]
        assert ids[-1] == added["id"], (added, grown.convert_ids_to_tokens(ids))
    stored = np.fromfile(ws.increment_dir(inc) / "train.bin", manifest["dtype"])
    assert int((stored >= len(old)).sum()) > 0  # the increment was tokenized with the revision
    train = report["tokens"]["train"]
    assert train["after"] < train["before"] and train["per_document_after"] < train["per_document_before"]


def test_more_words_asked_than_found_adds_what_there_is(tmp_path):
    ws = _workspace(tmp_path, "bert")
    path = _pydocs(tmp_path, slice(0, 150))
    result = runner.invoke(app, ["ingest", str(ws.root), str(path), "--extend-vocab", "500", "vocab.min_frequency=4"])
    assert result.exit_code == 0, result.output
    report = ws.increment_manifest(ws.increments()[0])["vocab"]
    assert 0 < len(report["added"]) == report["candidates"] < 500
    assert f"only {report['candidates']} word(s)" in result.output


def test_no_qualifying_word_leaves_the_tokenizer_as_it_is(tmp_path):
    ws = _workspace(tmp_path, "bert")
    result = _ingest(ws, _pydocs(tmp_path, slice(0, 20)), extend_vocab=3)
    manifest = ws.increment_manifest(result.increment)
    assert manifest["vocab"] is None and not (ws.increment_dir(result.increment) / vocab.TOKENIZER_DIR).exists()
    assert manifest["tokenizer_sha256"] == tokenizer_sha256(load_tokenizer(ws, "v0000"))


def test_a_tokenizer_that_cannot_grow_is_refused_before_anything_is_written(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                         cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    ws = _workspace(tmp_path, "bert")
    with pytest.raises(UsageError, match="WordLevel tokenizer, which cannot grow here; supported: WordPiece"):
        _ingest(ws, _pydocs(tmp_path), extend_vocab=3, tokenizer=word_level)
    assert ws.increments() == [] and not list(ws.staging.glob("tmp-*"))


def test_a_plain_ingest_after_an_extending_one_uses_the_revision(tmp_path):
    ws = _workspace(tmp_path, "bert")
    first = _ingest(ws, _pydocs(tmp_path, slice(0, 300)), extend_vocab=4).increment
    second = _ingest(ws, _pydocs(tmp_path, slice(300, 400))).increment
    a, b = ws.increment_manifest(first), ws.increment_manifest(second)
    assert b["tokenizer_sha256"] == a["vocab"]["sha256"] and b["tokenizer_lineage"] == a["vocab"]["lineage"]
    assert b["vocab"] is None and b["vocab_size"] == a["vocab_size"]
    third = _ingest(ws, _pydocs(tmp_path, slice(400, 700)), extend_vocab=3).increment  # extends the revision
    c = ws.increment_manifest(third)["vocab"]
    assert c["lineage"][:2] == a["vocab"]["lineage"] and c["revision"] == 2 and c["base_size"] == a["vocab"]["size"]


def test_revisions_that_grew_apart_are_refused_at_training(tmp_path):
    ws = _workspace(tmp_path, "bert")
    base = load_tokenizer(ws, "v0000")
    first = _ingest(ws, _pydocs(tmp_path, slice(0, 300)), extend_vocab=4).increment
    # the same base grown by other words: its new ids mean other words than first's
    second = _ingest(ws, _pydocs(tmp_path, slice(300, 700)), extend_vocab=4, tokenizer=base).increment
    assert ws.increment_manifest(second)["vocab"]["lineage"][0] == ws.increment_manifest(first)["vocab"]["lineage"][0]
    result = runner.invoke(app, ["train-increment", str(ws.root)])
    assert result.exit_code == 2, result.output
    assert "tokenizer revision" in result.output and ws.versions() == ["v0000"]
    with pytest.raises(InputError, match="does not extend"):
        vocab.line_tokenizer(ws)
