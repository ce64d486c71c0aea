"""Chinese whole-word masking: jieba's word boundaries, computed once at ingest and stored beside the
shards, make a word of several characters one masking unit; English in mixed text keeps its own."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from incr_cli.config.recipe import MaskingConfig, load_recipe
from incr_cli.data.packing import tokenize_with_offsets
from incr_cli.data.segment import ChineseWords
from incr_cli.data.shards import open_increment
from incr_cli.line.increment import train_increment
from incr_cli.model.weights import init_workspace, load_tokenizer
from incr_cli.store.workspace import Workspace
from incr_cli.training.masking import TokenIds, mask_batch, word_start_table
from tests.helpers_train import REPO, SAMPLES, _ingest, excerpt

pytest.importorskip("jieba")
sys.path.insert(0, str(REPO / "scripts"))
from make_zh_base import write_zh_base  # noqa: E402

CHINESE = SAMPLES / "chinese.txt"


@pytest.fixture(scope="module")
def zh_line(tmp_path_factory) -> Workspace:
    """A tiny BERT whose vocabulary covers samples/chinese.txt, with 120 of its documents ingested
    under masking.whole_word=true (so segmented)."""
    tmp = tmp_path_factory.mktemp("zh")
    base = write_zh_base(tmp / "base", CHINESE.read_text(encoding="utf-8"))
    init_workspace(tmp / "ws", str(base), load_recipe(REPO / "recipes" / "cpu-tiny.yaml", ["masking.whole_word=true"]))
    ws = Workspace.open(tmp / "ws")
    _ingest(ws, excerpt("chinese.txt", slice(0, 120), tmp), "zh")
    return ws


def _units(starts: np.ndarray) -> list[list[int]]:
    """Positions grouped into words, from a (T,) bool word-start row."""
    words: list[list[int]] = []
    for t, start in enumerate(starts):
        if start or not words:
            words.append([t])
        else:
            words[-1].append(t)
    return words


def test_jieba_joins_chinese_words_and_leaves_english_alone(zh_line):
    tok = load_tokenizer(zh_line, "v0000")
    text = "要有礼貌 在 Debian 这种规模的项目中使用Linux系统"
    ids, offsets = tokenize_with_offsets(tok, [text])
    bits = ChineseWords().continues(text, offsets[0])
    pieces = tok.convert_ids_to_tokens(ids[0])
    joined = {pieces[i - 1] + pieces[i] for i, b in enumerate(bits) if b}
    assert {"礼貌", "这种", "规模", "项目", "系统"} <= joined
    english = [i for i, p in enumerate(pieces) if p.isascii()]
    assert english and not any(bits[i] for i in english)  # Debian, Linux: the vocabulary's own boundaries


def test_a_chinese_word_of_several_characters_is_masked_whole(zh_line):
    shards = open_increment(zh_line, "d0001-zh")
    assert zh_line.increment_manifest("d0001-zh")["words"]["segmenter"].startswith("jieba")
    assert shards.train_words is not None and shards.train_words.shape == shards.train.shape
    tok = load_tokenizer(zh_line, "v0000")
    ids = torch.from_numpy(shards.train[:16].astype(np.int64))
    continues = torch.from_numpy(shards.train_words[:16].astype(bool))
    table = word_start_table(tok)
    tokens = TokenIds(torch.tensor(tok.all_special_ids), tok.mask_token_id, len(tok), word_starts=table)
    masked = mask_batch(ids, MaskingConfig(probability=0.3, whole_word=True), tokens,
                        generator=torch.Generator().manual_seed(0), continues=continues)
    long_words_masked = 0
    for row in range(ids.shape[0]):
        special = torch.isin(ids[row], torch.tensor(tok.all_special_ids))
        after_special = torch.cat([torch.tensor([True]), special[:-1]])  # a row may start mid-word
        starts = (table[ids[row]] & ~continues[row] | special | after_special).numpy()
        for word in _units(starts):
            chosen = masked.positions[row, word]
            assert bool(chosen.all()) or not bool(chosen.any()), "a word was split"
            long_words_masked += len(word) >= 2 and bool(chosen.all())
    assert long_words_masked > 0
    without = mask_batch(ids, MaskingConfig(probability=0.3, whole_word=True), tokens,
                         generator=torch.Generator().manual_seed(0))
    assert not torch.equal(without.positions, masked.positions)  # the tokenizer alone masks single characters


def test_a_segmented_line_trains_and_evaluates(zh_line, tmp_path):
    ws = zh_line.copy_to(tmp_path / "ws")
    with ws.lock("train-increment"):
        result = train_increment(ws, load_recipe(ws.recipe_path, ["train.steps=2"]))
    assert result.promoted and result.metrics["eval"]["after"]["d0001-zh"]["loss"] is not None


def test_english_text_is_not_segmented(tiny_workspace, tmp_path: Path):
    result_inc = _ingest_with(tiny_workspace, excerpt("fortunes.txt", slice(0, 40), tmp_path))
    assert tiny_workspace.increment_manifest(result_inc).get("words") is None


def _ingest_with(ws: Workspace, path: Path) -> str:
    from incr_cli.data.ingest import ingest

    with ws.lock("ingest"):
        result = ingest(ws, [str(path)], recipe=load_recipe(ws.recipe_path, ["masking.whole_word=true"]))
    assert result.increment
    return result.increment
