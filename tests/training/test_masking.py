"""Masking: which positions are chosen, how they are replaced, and that it is reproducible."""

from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizerFast

from incr_cli.config.recipe import MaskingConfig
from incr_cli.training.masking import (
    TokenIds,
    _draw_non_special,
    mask_batch,
    special_tokens_mask,
    word_start_table,
)

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = torch.tensor([PAD, UNK, CLS, SEP, MASK])


def packed_ids(rows: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(rows, length) like ingest writes them: [CLS] ... with [SEP]s inside, a padded last row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, length), generator=g)
    ids[:, 0] = CLS
    ids[torch.rand((rows, length), generator=g) < 0.05] = SEP
    ids[-1, length // 2:] = PAD
    return ids


def run(ids, cfg, seed=0, vocab=99, word_starts=None):
    g = torch.Generator().manual_seed(seed)
    return mask_batch(ids, cfg, TokenIds(SPECIAL, MASK, vocab, word_starts=word_starts), generator=g)


def test_special_tokens_mask():
    ids = torch.tensor([[CLS, 7, SEP, PAD], [CLS, MASK, 9, 5]])
    expected = torch.tensor([[True, False, True, True], [True, True, False, False]])
    assert torch.equal(special_tokens_mask(ids, SPECIAL), expected)


@pytest.mark.parametrize("cfg", [MaskingConfig(), MaskingConfig(probability=0.9), MaskingConfig(per_sequence=20),
                                 MaskingConfig(whole_word=True)])
def test_special_tokens_never_chosen_or_drawn(cfg):
    ids = packed_ids(256, 32, 99)
    starts = torch.rand(99, generator=torch.Generator().manual_seed(1)) < 0.6
    out = run(ids, cfg, word_starts=starts)
    special = special_tokens_mask(ids, SPECIAL)
    assert not (out.positions & special).any()
    # Only chosen positions change, and a changed one is [MASK] or a non-special token.
    changed = out.input_ids != ids
    assert not (changed & ~out.positions).any()
    assert not special_tokens_mask(out.input_ids[changed & (out.input_ids != MASK)], SPECIAL).any()
    assert torch.equal(out.targets, ids[out.positions])
    assert out.input_ids.dtype == torch.long and out.targets.dtype == torch.long


@pytest.mark.parametrize("whole_word", [False, True])
@pytest.mark.parametrize("probability", [0.15, 0.5])
def test_probability_rate(probability, whole_word):
    ids = packed_ids(2000, 64, 99)
    starts = torch.rand(99, generator=torch.Generator().manual_seed(1)) < 0.5  # words of ~2 pieces
    out = run(ids, MaskingConfig(probability=probability, whole_word=whole_word), word_starts=starts)
    maskable = ~special_tokens_mask(ids, SPECIAL)
    rate = out.positions.sum().item() / maskable.sum().item()
    assert rate == pytest.approx(probability, abs=0.005)


def test_every_row_with_a_maskable_token_gets_one():
    ids = torch.full((64, 16), PAD)
    ids[:, 0] = CLS
    ids[:32, 1] = 50  # one maskable token; the other 32 rows have none
    out = run(ids, MaskingConfig(probability=0.01))
    assert torch.equal(out.positions.sum(dim=1), (torch.arange(64) < 32).long())


def test_per_sequence_exact_counts():
    ids = packed_ids(64, 32, 99)
    ids[:16, 4:] = PAD  # rows with at most 3 maskable tokens
    maskable = (~special_tokens_mask(ids, SPECIAL)).sum(dim=1)
    out = run(ids, MaskingConfig(per_sequence=5))
    assert torch.equal(out.positions.sum(dim=1), maskable.clamp(max=5))


def test_replacement_proportions():
    ids = packed_ids(1000, 64, 5000)
    out = run(ids, MaskingConfig(probability=0.3), vocab=5000)
    n = out.targets.numel()
    chosen = out.input_ids[out.positions]
    masked = (chosen == MASK).sum().item() / n
    kept = (chosen == out.targets).sum().item() / n  # includes the rare random draw of the same id
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1, abs=0.01)
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.01)


def test_custom_ratios():
    ids = packed_ids(500, 64, 5000)
    out = run(ids, MaskingConfig(mask_token_ratio=1.0, random_token_ratio=0.0), vocab=5000)
    assert (out.input_ids[out.positions] == MASK).all()
    out = run(ids, MaskingConfig(mask_token_ratio=0.0, random_token_ratio=0.0), vocab=5000)
    assert torch.equal(out.input_ids, ids)


def test_random_tokens_uniform_over_non_special():
    # Duplicates and ids outside the vocabulary in special_ids must not skew the draw.
    special = torch.tensor([9, 0, 3, 3, 120, 5])
    uniform = torch.rand((200_000,), generator=torch.Generator().manual_seed(0))
    drawn = _draw_non_special(uniform, special, 10)
    counts = torch.bincount(drawn, minlength=10)
    assert counts[[0, 3, 5, 9]].sum() == 0
    allowed = counts[[1, 2, 4, 6, 7, 8]].float() / drawn.numel()
    torch.testing.assert_close(allowed, torch.full((6,), 1 / 6), atol=0.005, rtol=0)
    assert _draw_non_special(torch.tensor([1 - 2**-24]), special, 10).item() == 8


def word_ids_of(ids: torch.Tensor, starts: torch.Tensor) -> list[list[int]]:
    """Reference grouping in plain Python: a word starts at a start token, a special token,
    right after a special token, or at position 0."""
    groups = []
    for row in ids.tolist():
        word, out, prev_special = -1, [], True
        for token in row:
            special = token in SPECIAL.tolist()
            if special or prev_special or starts[token]:
                word += 1
            out.append(word)
            prev_special = special
        groups.append(out)
    return groups


@pytest.mark.parametrize("cfg", [MaskingConfig(whole_word=True), MaskingConfig(whole_word=True, per_sequence=4)])
def test_whole_word_masks_whole_words(cfg):
    ids = packed_ids(200, 32, 99)
    starts = torch.rand(99, generator=torch.Generator().manual_seed(3)) < 0.5
    starts[SPECIAL] = True
    out = run(ids, cfg, word_starts=starts)
    maskable = ~special_tokens_mask(ids, SPECIAL)
    for row, groups in enumerate(word_ids_of(ids, starts)):
        words: dict[int, set[bool]] = {}
        for t, w in enumerate(groups):
            if maskable[row, t]:
                words.setdefault(w, set()).add(bool(out.positions[row, t]))
        assert all(len(chosen) == 1 for chosen in words.values()), f"row {row} splits a word"
        if maskable[row].any():
            assert out.positions[row].any()
    if cfg.per_sequence is not None:
        # At most k tokens, unless the only chosen thing is one word longer than k.
        counts = out.positions.sum(dim=1)
        over = counts > cfg.per_sequence
        assert over.float().mean() < 0.05
    else:
        rate = out.positions.sum().item() / maskable.sum().item()
        assert rate == pytest.approx(0.15, abs=0.015)


def test_whole_word_needs_the_table():
    with pytest.raises(ValueError, match="word_starts"):
        run(packed_ids(2, 8, 99), MaskingConfig(whole_word=True))


def test_word_start_table_wordpiece(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "play", "##ing", "##ed", "the", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))  # transformers 5 ignores vocab_file=
    table = word_start_table(tok)
    assert table.tolist() == [not t.startswith("##") for t in vocab]


class _BpeTokenizer:
    """The four members word_start_table uses, for a byte-level BPE vocabulary."""

    tokens = ["<s>", "<pad>", "</s>", "<mask>", "Ġthe", "Ġplay", "ing", "ed", "Ġcat", "s"]
    all_special_ids = [0, 1, 2, 3]

    def __len__(self):
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]

    def get_added_vocab(self):
        return {}


def test_word_start_table_bpe():
    table = word_start_table(_BpeTokenizer())
    assert table.tolist() == [True, True, True, True, True, True, False, False, True, False]


@pytest.mark.parametrize("cfg", [MaskingConfig(), MaskingConfig(per_sequence=3), MaskingConfig(whole_word=True)])
def test_deterministic_for_a_seed(cfg):
    ids = packed_ids(32, 32, 99)
    starts = torch.rand(99, generator=torch.Generator().manual_seed(1)) < 0.6
    a, b = run(ids, cfg, seed=7, word_starts=starts), run(ids, cfg, seed=7, word_starts=starts)
    c = run(ids, cfg, seed=8, word_starts=starts)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.positions, b.positions)
    assert not torch.equal(a.positions, c.positions)


def test_same_under_bf16_autocast():
    ids = packed_ids(16, 32, 99)
    plain = run(ids, MaskingConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = run(ids, MaskingConfig())
    assert torch.equal(plain.input_ids, auto.input_ids) and torch.equal(plain.positions, auto.positions)


def test_accepts_narrow_integer_ids():
    ids = packed_ids(8, 16, 99)
    out = run(ids.to(torch.int32), MaskingConfig())
    assert torch.equal(out.positions, run(ids, MaskingConfig()).positions)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_with_a_cuda_generator():
    ids = packed_ids(64, 32, 99).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = TokenIds(SPECIAL.cuda(), MASK, 99, word_starts=torch.ones(99, dtype=torch.bool, device="cuda"))
    out = mask_batch(ids, MaskingConfig(whole_word=True), tokens, generator=g)
    assert out.positions.is_cuda and not (out.positions & special_tokens_mask(ids, SPECIAL)).any()
