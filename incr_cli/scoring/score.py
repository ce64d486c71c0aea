"""Pure scoring: masked-token loss, perplexity and accuracy of packed held-out sequences, with masks
seeded by the increment and the recipe so that every version is scored on the same positions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from incr_cli.config.recipe import Recipe
from incr_cli.data.shards import open_increment
from incr_cli.errors import IntegrityError
from incr_cli.model.heads import MaskedLMHead
from incr_cli.model.vocab import NO_LIMITS, VocabLimits
from incr_cli.runtime.device import CPU, Placement, inference
from incr_cli.store.files import sha256_file
from incr_cli.store.workspace import Workspace
from incr_cli.training.losses import mlm_loss_sum, topk_correct
from incr_cli.training.masking import TokenIds, mask_batch, stable_seed, tokenizer_inputs

MASK_CHUNK = 64  # rows masked per generator seed; independent of eval.batch_size
SCORE_KEYS = ("loss", "perplexity", "accuracy", "top5", "tokens")
CELL_KEYS = (*SCORE_KEYS, "coverage")  # coverage: the share of masked positions scored (see score_sequences)


# ----------------------------------------------------------------------------- scoring


def eval_masks(ids: torch.Tensor, *, key: str, recipe: Recipe, tokens: TokenIds,
               continues: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (N, T) long on CPU -> (masked input ids (N, T), positions (N, T) bool), on CPU.
    ``continues`` (N, T) bool: the word-continuation bits of a segmented increment (see mask_batch).

    Chunk c (rows c*MASK_CHUNK ...) is masked with a generator seeded by stable_seed(eval.seed, key, c),
    so a row's mask depends only on the settings, the key and its index: not on the device, the
    batch size or the version being scored.
    """
    masked, positions = torch.empty_like(ids), torch.zeros(ids.shape, dtype=torch.bool)
    for c, start in enumerate(range(0, ids.shape[0], MASK_CHUNK)):
        gen = torch.Generator().manual_seed(stable_seed(recipe.eval.seed, key, c))
        batch = mask_batch(ids[start:start + MASK_CHUNK], recipe.masking, tokens, generator=gen,
                           continues=None if continues is None else continues[start:start + MASK_CHUNK])
        masked[start:start + MASK_CHUNK] = batch.input_ids
        positions[start:start + MASK_CHUNK] = batch.positions
    return masked, positions


@dataclass(frozen=True)
class HeldOut:
    """Rows to score: ``ids`` (N, T), the ``key`` that seeds their masks (an increment id: every
    version is masked alike), and a segmented increment's word-continuation bits (N, T)."""

    key: str
    ids: np.ndarray
    continues: np.ndarray | None = None


def score_sequences(head: MaskedLMHead, rows: HeldOut, *, recipe: Recipe, tokens: TokenIds,
                    place: Placement = CPU, limits: VocabLimits = NO_LIMITS) -> dict[str, Any]:
    """Held-out MLM scores of ``head`` on the first ``recipe.eval.max_sequences`` of ``rows``.

    -> {loss: summed cross-entropy / masked tokens, perplexity: exp(loss), accuracy: top-1 share,
    top5: top-5 share, tokens: masked tokens, coverage}; the float entries are None when nothing was
    masked (no rows). ``tokens``: the tokenizer's ids (``pad_id`` defaults to the model config's;
    ``word_starts`` for whole-word masking). The head's training flag is restored afterwards.

    ``tokens.vocab_size`` is the increment's vocabulary (random replacements of the masks come from it,
    so masks never depend on the version). ``limits`` (see ``VocabLimits``) score a version whose
    vocabulary predates the increment's, or two versions on the positions valid for both;
    ``coverage`` is the share of the masked positions that were scored.
    """
    n = recipe.eval.max_sequences
    ids = np.asarray(rows.ids[:n])
    if ids.ndim != 2:
        raise ValueError(f"score_sequences: ids must be (N, T), got shape {ids.shape}")
    input_ids = torch.from_numpy(ids.astype(np.int64))  # (N, T)
    bits = None
    if rows.continues is not None and tokens.word_starts is not None:
        bits = torch.from_numpy(np.asarray(rows.continues[:n]).astype(bool))
    masked, positions = eval_masks(input_ids, key=rows.key, recipe=recipe, tokens=tokens, continues=bits)
    pad = tokens.pad_id if tokens.pad_id is not None else getattr(head.model.config, "pad_token_id", None)
    attention = input_ids != pad if pad is not None else torch.ones_like(input_ids, dtype=torch.bool)
    masked_total = int(positions.sum())
    unk = tokens.unk_id if tokens.unk_id is not None else tokens.mask_token_id
    positions, masked = _restrict(input_ids, masked, positions, unk, limits)

    batch = _MaskedRows(input_ids, masked, attention, positions)
    loss_sum, top1, top5 = _score_batches(head, batch, place=place, batch_size=recipe.eval.batch_size,
                                          model_vocab=limits.model_vocab)
    scored = int(positions.sum())
    coverage = scored / masked_total if masked_total else None
    if scored == 0:
        return {"loss": None, "perplexity": None, "accuracy": None, "top5": None, "tokens": 0, "coverage": coverage}
    loss = float(loss_sum) / scored
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "accuracy": int(top1) / scored, "top5": int(top5) / scored, "tokens": scored, "coverage": coverage}


@dataclass(frozen=True)
class _MaskedRows:
    """(N, T) each: the original ids (the targets), the masked input, attention, the scored positions."""

    input_ids: torch.Tensor
    masked: torch.Tensor
    attention: torch.Tensor
    positions: torch.Tensor


def _score_batches(head: MaskedLMHead, rows: _MaskedRows, *, place: Placement, batch_size: int,
                   model_vocab: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked rows -> (summed loss, top-1 hits, top-5 hits), on the device; logits cut to
    ``model_vocab`` when given."""
    device = place.device
    # Sums stay on the device; one sync at the end.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    # The wrapped model's flag, not the wrapper's: a fresh MaskedLMHead says "training" even
    # around a model in eval mode, and restoring that would switch dropout on for the caller.
    with inference(getattr(head, "model", head)):
        for start in range(0, rows.input_ids.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            pos = rows.positions[sl]
            if not bool(pos.any()):
                continue
            targets = rows.input_ids[sl][pos].to(device)  # (n,) row-major like the head's logits
            with place.autocast():
                logits, _ = head(rows.masked[sl].to(device), rows.attention[sl].to(device), pos.to(device))  # (n, V)
            if model_vocab is not None:
                logits = logits[:, :model_vocab]  # the version's own vocabulary
            loss_sum += mlm_loss_sum(logits, targets).double()
            top1 += topk_correct(logits, targets, 1)
            top5 += topk_correct(logits, targets, 5)
    return loss_sum, top1, top5


def _restrict(ids: torch.Tensor, masked: torch.Tensor, positions: torch.Tensor, unk_id: int,
              limits: VocabLimits) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, masked, positions (N, T) -> (positions scored, masked input as the version reads it): targets
    at or above ``model_vocab`` / ``valid_below`` are not scored; input ids the version lacks read as unk_id."""
    below = [v for v in (limits.model_vocab, limits.valid_below) if v is not None]
    if below:
        positions = positions & (ids < min(below))
    if limits.model_vocab is not None:
        masked = torch.where(masked >= limits.model_vocab, torch.full_like(masked, unk_id), masked)
    return positions, masked


def read_heldout(ws: Workspace, increment_id: str, *, check: bool = True) -> np.ndarray:
    """The held-out rows of an increment, (n, seq_len) (a memmap, or empty).

    ``check`` compares heldout.bin's sha256 with the manifest (its size is always checked); the
    train split is not hashed, since eval never reads it.
    """
    shards = open_increment(ws, increment_id, verify=False)
    record = (shards.manifest.get("files") or {}).get("heldout.bin") or {}
    if check and sha256_file(ws.increment_dir(increment_id) / "heldout.bin") != record.get("sha256"):
        raise IntegrityError(f"{increment_id}: heldout.bin does not match its sha256 in the manifest; "
                             f"it was altered: remove {ws.increment_dir(increment_id)} and ingest again")
    return shards.heldout


def heldout_words(ws: Workspace, increment_id: str) -> np.ndarray | None:
    """The held-out word-continuation bits of a segmented increment (size checked), else None."""
    return open_increment(ws, increment_id, verify=False).heldout_words


def score_increment(head: MaskedLMHead, ws: Workspace, increment_id: str, recipe: Recipe, tokenizer: Any,
                    place: Placement = CPU) -> dict[str, Any]:
    """score_sequences on an increment's held-out split (its checksum checked first), masked over the
    increment's own vocabulary like ``incr eval``."""
    tokens = tokenizer_inputs(tokenizer, recipe)
    tokens = tokens.of_vocab(ws.increment_manifest(increment_id).get("vocab_size") or tokens.vocab_size)
    rows = HeldOut(increment_id, read_heldout(ws, increment_id), heldout_words(ws, increment_id))
    return score_sequences(head, rows, recipe=recipe, tokens=tokens, place=place)


def held_out_scores(model: torch.nn.Module, tokenizer: Any, ws: Workspace, increments: list[str], recipe: Recipe,
                    place: Placement = CPU) -> dict[str, dict[str, Any]]:
    """{increment: held-out loss, perplexity, accuracy} of ``model`` (the same masks as `incr eval`)."""
    head = MaskedLMHead(model)
    return {inc: {k: v for k, v in score_increment(head, ws, inc, recipe, tokenizer, place).items()
                  if k in ("loss", "perplexity", "accuracy", "top5", "tokens")} for inc in increments}
