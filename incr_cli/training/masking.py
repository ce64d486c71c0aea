"""Masked-language-model masking: which positions to predict and what the model sees there.

Pure tensor functions, no per-token Python loops, on whatever device the ids live on (the
``torch.Generator`` must be on that device too). The same ids, config and generator state give the
same masks, so runs and evaluations are reproducible.

How positions are chosen, per row:
- the maskable positions are the non-special tokens (``special_ids`` are never masked; callers
  put the unknown token among them, see ``evaluate.tokenizer_inputs``);
- the row's budget ``k`` is ``cfg.per_sequence`` capped by its maskable count, or else
  ``probability * maskable`` with stochastic rounding (unbiased) and at least 1, so no row with a
  maskable token contributes an empty loss;
- units (tokens, or whole words with ``cfg.whole_word``) are shuffled with random scores and taken
  in that order while their cumulative token count stays within ``k`` (always at least one unit).
  For single tokens that is exactly ``k`` positions. A whole word is never split: with
  ``per_sequence`` a row gets at most ``k`` positions (or one word longer than ``k`` when no word
  fits); with ``probability`` the word that crosses ``k`` is taken with probability
  (room left) / (its length), so the expected share of masked tokens is still ``probability``.
Word boundaries come from the vocabulary's markers, refined by ``continues`` where ingest segmented
Chinese text (a word of several characters is then one unit).
Of the chosen positions, ``mask_token_ratio`` become the mask token, ``random_token_ratio`` a random
non-special token, and the rest keep their token (BERT's 80/10/10).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import torch

from incr_cli.config.recipe import MaskingConfig, Recipe
from incr_cli.errors import UsageError

WORDPIECE_CONTINUATION = "##"


def stable_seed(*parts: object) -> int:
    """A 63-bit generator seed from ``parts`` (their ``str`` joined by NUL, hashed with sha256).

    The same parts give the same seed on every run and machine (Python's ``hash()`` is salted);
    every seeded mask stream (training, eval, the EWC Fisher) draws its seeds from here.
    """
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


BPE_WORD_STARTS = ("Ġ", "▁")  # byte-level BPE (RoBERTa, GPT-2) and SentencePiece


@dataclass(frozen=True)
class MaskedBatch:
    """input_ids (B, T) long with the replacements applied; positions (B, T) bool, the chosen
    positions; targets (N,) long, the original ids at ``positions`` in row-major order
    (N = positions.sum(), the same order as ``hidden[positions]``)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor


@dataclass(frozen=True)
class TokenIds:
    """What masking and scoring take from a tokenizer: one value for training and for eval, so a
    run's before/after scores equal ``incr eval``'s."""

    special_ids: torch.Tensor  # (S,) never masked: the special tokens and [UNK]
    mask_token_id: int
    vocab_size: int  # random replacements of the masks come from [0, vocab_size)
    pad_id: int | None = None
    unk_id: int | None = None
    word_starts: torch.Tensor | None = None  # (V,) bool, for whole-word masking

    def of_vocab(self, size: int) -> TokenIds:
        """The same ids, masking over an increment's vocabulary of ``size`` (it may have grown)."""
        return replace(self, vocab_size=int(size))

    def to(self, device: torch.device | str) -> TokenIds:
        """The same ids with their tensors on ``device`` (masking there without a copy per batch)."""
        starts = None if self.word_starts is None else self.word_starts.to(device)
        return replace(self, special_ids=self.special_ids.to(device), word_starts=starts)


def special_tokens_mask(input_ids: torch.Tensor, special_ids: torch.Tensor) -> torch.Tensor:
    """input_ids (B, T) integer, special_ids (S,) integer -> (B, T) bool, True at special tokens."""
    return torch.isin(input_ids, special_ids.to(device=input_ids.device, dtype=input_ids.dtype))


def word_start_table(tokenizer) -> torch.Tensor:
    """-> (V,) bool over ``len(tokenizer)`` ids: True where a token starts a word.

    WordPiece vocabularies mark continuations with "##"; BPE/SentencePiece ones mark starts with
    "Ġ"/"▁". Special and added tokens count as starts. A vocabulary with neither marker gives all
    True, which makes whole-word masking plain token masking rather than guessing.
    """
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    tokens = [t if isinstance(t, str) else "" for t in tokens]
    if any(t.startswith(WORDPIECE_CONTINUATION) for t in tokens):
        starts = [not t.startswith(WORDPIECE_CONTINUATION) for t in tokens]
    elif any(t.startswith(BPE_WORD_STARTS) for t in tokens):
        starts = [t.startswith(BPE_WORD_STARTS) for t in tokens]
    else:
        starts = [True] * len(tokens)
    table = torch.tensor(starts, dtype=torch.bool)
    special = [i for i in tokenizer.all_special_ids if 0 <= i < len(tokens)]
    table[special] = True
    added = [i for i in tokenizer.get_added_vocab().values() if 0 <= i < len(tokens)]
    table[added] = True
    return table


def mask_batch(input_ids: torch.Tensor, cfg: MaskingConfig, tokens: TokenIds, *, generator: torch.Generator,
               continues: torch.Tensor | None = None) -> MaskedBatch:
    """Choose and replace the positions to predict.

    input_ids (B, T) integer; ``tokens``: its special_ids (S,) are never masked nor drawn as random
    replacements, replacements come from [0, vocab_size), and its word_starts (V,) bool (from
    ``word_start_table``) are required when ``cfg.whole_word``; continues (B, T) bool, optional: True
    where a token continues the word of the token before it although the vocabulary says it starts one
    (Chinese words from a segmenter, see segment.py); generator on ``input_ids.device``.
    -> MaskedBatch (see the module docstring).
    """
    special_ids, mask_token_id, vocab_size = tokens.special_ids, tokens.mask_token_id, tokens.vocab_size
    ids = input_ids.long()
    device = ids.device
    batch, length = ids.shape
    special = special_tokens_mask(ids, special_ids)  # (B, T)
    maskable = ~special

    # Random draws in a fixed order, so the stream does not depend on the config's branches.
    scores = torch.rand((batch, length), generator=generator, device=device)  # (B, T)
    row_draw = torch.rand((batch, 2), generator=generator, device=device)  # (B, 2)
    action = torch.rand((batch, length), generator=generator, device=device)  # (B, T)
    replacement_draw = torch.rand((batch, length), generator=generator, device=device)  # (B, T)

    n_maskable = maskable.sum(dim=1, keepdim=True)  # (B, 1)
    hard_cap = cfg.per_sequence is not None
    if hard_cap:
        budget = n_maskable.clamp(max=cfg.per_sequence)
    else:
        budget = (cfg.probability * n_maskable + row_draw[:, :1]).floor().long()  # stochastic rounding
        budget = torch.minimum(budget.clamp(min=1), n_maskable)  # (B, 1)

    word_id, unit_length, unit_maskable = _units(ids, special, cfg.whole_word, tokens.word_starts, continues)

    # Shuffle the units (non-maskable ones last) and walk them in that order.
    if hard_cap:
        # A cap is a cap: take the prefix that fits. Units that fit on their own go first, so a
        # word longer than the budget is only taken when no word fits.
        scores = torch.where(unit_length <= budget, scores + 1.0, scores)
    order = torch.where(unit_maskable, scores, -1.0).argsort(dim=1, descending=True)  # (B, U)
    sorted_length = unit_length.gather(1, order)  # (B, U)
    room = budget - (sorted_length.cumsum(dim=1) - sorted_length)  # (B, U) budget left before each unit
    if hard_cap:
        take_sorted = sorted_length <= room
    else:
        # Units that fit are taken; the one that crosses the budget with probability room / length,
        # so the expected count is the budget (a rate of p) though words are never split.
        take_sorted = row_draw[:, 1:] * sorted_length < room
    first = torch.zeros_like(take_sorted)
    first[:, 0] = True
    take_sorted = (take_sorted | first) & unit_maskable.gather(1, order) & (budget > 0)
    take_unit = torch.zeros_like(take_sorted).scatter(1, order, take_sorted)  # (B, U)
    positions = take_unit.gather(1, word_id) & maskable  # (B, T)

    replace_mask = positions & (action < cfg.mask_token_ratio)
    replace_random = positions & ~replace_mask & (action < cfg.mask_token_ratio + cfg.random_token_ratio)
    random_ids = _draw_non_special(replacement_draw, special_ids.to(device), vocab_size)
    masked = torch.where(replace_mask, torch.full_like(ids, mask_token_id), ids)
    masked = torch.where(replace_random, random_ids, masked)
    return MaskedBatch(input_ids=masked, positions=positions, targets=ids[positions])


def _units(ids: torch.Tensor, special: torch.Tensor, whole_word: bool, word_starts: torch.Tensor | None,
           continues: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The units masking picks: whole words (``_words``) or single tokens (each its own unit)."""
    if whole_word:
        if word_starts is None:
            raise ValueError("mask_batch: masking.whole_word needs word_starts (use word_start_table(tokenizer))")
        return _words(ids, special, word_starts.to(ids.device), None if continues is None else continues.to(ids.device))
    batch, length = ids.shape
    word_id = torch.arange(length, device=ids.device).expand(batch, length)
    return word_id, torch.ones((batch, length), dtype=torch.long, device=ids.device), ~special


def _words(ids: torch.Tensor, special: torch.Tensor, word_starts: torch.Tensor, continues: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group tokens into words. ids, special (B, T) -> word_id (B, T) in [0, T), the word of each
    token; length (B, T) tokens per word id; maskable (B, T) per word id.

    A word starts at a word-start token, at a special token, right after a special token (a
    document's first piece may be a continuation when it follows [SEP] or starts a sequence), and
    at position 0. So a word is either all special or all maskable.
    """
    batch, length = ids.shape
    in_table = ids < word_starts.numel()
    starts = torch.where(in_table, word_starts[ids.clamp(max=word_starts.numel() - 1)], True)
    if continues is not None:
        starts = starts & ~continues
    after_special = torch.zeros_like(special)
    after_special[:, 1:] = special[:, :-1]
    starts = starts | special | after_special
    starts[:, 0] = True
    word_id = starts.long().cumsum(dim=1) - 1  # (B, T)
    unit_length = torch.zeros((batch, length), dtype=torch.long, device=ids.device)
    unit_length.scatter_add_(1, word_id, torch.ones_like(word_id))
    unit_maskable = torch.zeros_like(special).scatter(1, word_id, ~special)  # one value per word
    return word_id, unit_length, unit_maskable & (unit_length > 0)


def _draw_non_special(uniform: torch.Tensor, special_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """uniform (B, T) in [0, 1) -> (B, T) long ids uniform over [0, vocab_size) minus special_ids.

    The r-th allowed id is r + #{i : s_i - i <= r} over the sorted distinct specials s_i; computed
    with searchsorted so nothing waits on the device (no nonzero/unique with a data-dependent size).
    """
    s = special_ids.long().sort().values  # (S,)
    outside = (s < 0) | (s >= vocab_size)
    duplicate = torch.zeros_like(outside)
    duplicate[1:] = s[1:] == s[:-1]
    drop = outside | duplicate
    sentinel = vocab_size + 2 * s.numel() + 1  # sorts after every kept id, never <= r
    s = torch.where(drop, sentinel, s).sort().values
    n_allowed = vocab_size - (~drop).sum()
    # float32 rounding can give uniform * n == n; keep r a valid rank.
    r = torch.minimum((uniform * n_allowed).long(), n_allowed - 1)  # (B, T)
    shifted = s - torch.arange(s.numel(), device=s.device)
    return r + torch.searchsorted(shifted, r, right=True)


def tokenizer_inputs(tokenizer: Any, recipe: Recipe) -> TokenIds:
    """The ``TokenIds`` of ``tokenizer`` under ``recipe`` (word starts when masking.whole_word)."""
    if tokenizer.mask_token_id is None:
        raise UsageError(f"the tokenizer ({type(tokenizer).__name__}) has no mask token; incr needs a masked-LM tokenizer")
    # The unknown token is never a target (nor a random replacement): predicting [UNK] teaches nothing,
    # and a perplexity that counted it would look good on text the tokenizer cannot represent.
    never_masked = set(tokenizer.all_special_ids) | ({tokenizer.unk_token_id} - {None})
    return TokenIds(torch.tensor(sorted(never_masked), dtype=torch.long), int(tokenizer.mask_token_id), len(tokenizer),
                    tokenizer.pad_token_id, tokenizer.unk_token_id,
                    word_start_table(tokenizer) if recipe.masking.whole_word else None)
