"""Deterministic held-out scoring and the version x increment matrix, with its cache.

Every version is scored on identical inputs: the masks of an increment come from a generator
seeded by ``(eval.seed, increment id)`` only (never the version), over the first
``eval.max_sequences`` held-out rows, in fixed chunks of ``MASK_CHUNK`` rows so that
``eval.batch_size`` changes nothing. Numbers are therefore comparable across versions and runs.

The matrix is cached per cell in ``WORKSPACE/eval/cache/<key>.json``, the key being a hash of the
version's weight checksums (from its manifest), the column's data checksum and the settings that
change a score (max_sequences, seed, masking, precision). A repeated eval of unchanged versions
loads no model; a new version costs its own row. Eval writes only under ``eval/``, takes no lock,
and never touches a version folder.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from incr_cli import FORMAT_VERSION, __version__, vocab
from incr_cli.data import open_increment
from incr_cli.device import autocast, inference, resolve_device, resolve_precision
from incr_cli.diskspace import disk_writes
from incr_cli.errors import IntegrityError, UsageError, clip, shown
from incr_cli.heads import MaskedLMHead
from incr_cli.losses import mlm_loss_sum, topk_correct
from incr_cli.masking import mask_batch, stable_seed, word_start_table
from incr_cli.metrics import ContinualSummary, summarize
from incr_cli.recipe import Recipe
from incr_cli.reporting import Quiet, Reporter
from incr_cli.workspace import Workspace, atomic_write_text, finite_json, sha256_file

CACHE_FORMAT = 1  # bump when scoring changes, so older cached cells are never reused
MASK_CHUNK = 64  # rows masked per generator seed; independent of eval.batch_size
SCORE_KEYS = ("loss", "perplexity", "accuracy", "top5", "tokens")
CELL_KEYS = (*SCORE_KEYS, "coverage")  # coverage: the share of masked positions scored (see score_sequences)
# Files of a version folder that do not change its scores (logs, metrics, EWC statistics).
_NOT_WEIGHTS = ("fisher.safetensors",)


# ----------------------------------------------------------------------------- scoring


def eval_masks(ids: torch.Tensor, *, key: str, recipe: Recipe, special_ids: torch.Tensor, mask_token_id: int,
               vocab_size: int, word_starts: torch.Tensor | None = None,
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
        batch = mask_batch(ids[start:start + MASK_CHUNK], recipe.masking, special_ids=special_ids,
                           mask_token_id=mask_token_id, vocab_size=vocab_size, generator=gen,
                           word_starts=word_starts,
                           continues=None if continues is None else continues[start:start + MASK_CHUNK])
        masked[start:start + MASK_CHUNK] = batch.input_ids
        positions[start:start + MASK_CHUNK] = batch.positions
    return masked, positions


def score_sequences(head: MaskedLMHead, ids: np.ndarray, *, increment_id: str, recipe: Recipe,
                    special_ids: Sequence[int] | torch.Tensor, mask_token_id: int, vocab_size: int,
                    device: torch.device | str, precision: str, pad_id: int | None = None,
                    word_starts: torch.Tensor | None = None, continues: np.ndarray | None = None,
                    unk_id: int | None = None, model_vocab: int | None = None,
                    valid_below: int | None = None) -> dict[str, Any]:
    """Held-out MLM scores of ``head`` on the first ``recipe.eval.max_sequences`` rows of ids (N, T).

    -> {loss: summed cross-entropy / masked tokens, perplexity: exp(loss), accuracy: top-1 share,
    top5: top-5 share, tokens: masked tokens}; the float entries are None when nothing was masked
    (no rows). ``pad_id`` defaults to the model config's; ``word_starts`` (V,) is needed for
    whole-word masking, ``continues`` (N, T) are a segmented increment's word-continuation bits.
    The head's training flag is restored afterwards.

    ``vocab_size`` is the increment's vocabulary (random replacements of the masks come from it, so
    masks never depend on the version). A version with a smaller vocabulary (``model_vocab``: it
    predates the tokens an increment added) reads the ids it lacks as ``unk_id``, predicts over its
    own ``model_vocab`` logits, and is not scored at positions whose target it lacks; ``valid_below``
    excludes the positions whose target id is at or above it (to compare two versions on the
    positions valid for both). ``coverage`` is the share of the masked positions that were scored.
    """
    rows = np.asarray(ids[: recipe.eval.max_sequences])
    if rows.ndim != 2:
        raise ValueError(f"score_sequences: ids must be (N, T), got shape {rows.shape}")
    device = torch.device(device)
    input_ids = torch.from_numpy(rows.astype(np.int64))  # (N, T)
    specials = torch.as_tensor(special_ids, dtype=torch.long)
    bits = None
    if continues is not None and word_starts is not None:
        bits = torch.from_numpy(np.asarray(continues[: recipe.eval.max_sequences]).astype(bool))
    masked, positions = eval_masks(input_ids, key=increment_id, recipe=recipe, special_ids=specials,
                                   mask_token_id=mask_token_id, vocab_size=vocab_size, word_starts=word_starts,
                                   continues=bits)
    pad = pad_id if pad_id is not None else getattr(head.model.config, "pad_token_id", None)
    attention = input_ids != pad if pad is not None else torch.ones_like(input_ids, dtype=torch.bool)
    masked_total = int(positions.sum())
    positions, masked = _restrict(input_ids, masked, positions, unk_id if unk_id is not None else mask_token_id,
                                  model_vocab, valid_below)

    loss_sum, top1, top5 = _score_batches(head, input_ids, masked, attention, positions, device=device,
                                          precision=precision, batch_size=recipe.eval.batch_size,
                                          model_vocab=model_vocab)
    tokens = int(positions.sum())
    coverage = tokens / masked_total if masked_total else None
    if tokens == 0:
        return {"loss": None, "perplexity": None, "accuracy": None, "top5": None, "tokens": 0, "coverage": coverage}
    loss = float(loss_sum) / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "accuracy": int(top1) / tokens, "top5": int(top5) / tokens, "tokens": tokens, "coverage": coverage}


def _score_batches(head: MaskedLMHead, input_ids: torch.Tensor, masked: torch.Tensor, attention: torch.Tensor,
                   positions: torch.Tensor, *, device: torch.device, precision: str, batch_size: int,
                   model_vocab: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, T) ids, masked input, attention and scored positions -> (summed loss, top-1 hits, top-5
    hits), on the device; logits cut to ``model_vocab`` when given."""
    # Sums stay on the device; one sync at the end.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    # The wrapped model's flag, not the wrapper's: a fresh MaskedLMHead says "training" even
    # around a model in eval mode, and restoring that would switch dropout on for the caller.
    with inference(getattr(head, "model", head)):
        for start in range(0, input_ids.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            pos = positions[sl]
            if not bool(pos.any()):
                continue
            targets = input_ids[sl][pos].to(device)  # (n,) row-major like the head's logits
            with autocast(device, precision):
                logits, _ = head(masked[sl].to(device), attention[sl].to(device), pos.to(device))  # (n, V)
            if model_vocab is not None:
                logits = logits[:, :model_vocab]  # the version's own vocabulary
            loss_sum += mlm_loss_sum(logits, targets).double()
            top1 += topk_correct(logits, targets, 1)
            top5 += topk_correct(logits, targets, 5)
    return loss_sum, top1, top5


def _restrict(ids: torch.Tensor, masked: torch.Tensor, positions: torch.Tensor, unk_id: int,
              model_vocab: int | None, valid_below: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, masked, positions (N, T) -> (positions scored, masked input as the version reads it): targets
    at or above ``model_vocab`` / ``valid_below`` are not scored; input ids the version lacks read as unk_id."""
    limits = [v for v in (model_vocab, valid_below) if v is not None]
    if limits:
        positions = positions & (ids < min(limits))
    if model_vocab is not None:
        masked = torch.where(masked >= model_vocab, torch.full_like(masked, unk_id), masked)
    return positions, masked


def tokenizer_inputs(tokenizer: Any, recipe: Recipe) -> dict[str, Any]:
    """The keyword arguments of ``score_sequences`` that come from the tokenizer (use these in training
    too, so its before/after scores equal ``incr eval``'s)."""
    if tokenizer.mask_token_id is None:
        raise UsageError(f"the tokenizer ({type(tokenizer).__name__}) has no mask token; incr needs a masked-LM tokenizer")
    # The unknown token is never a target (nor a random replacement): predicting [UNK] teaches nothing,
    # and a perplexity that counted it would look good on text the tokenizer cannot represent.
    never_masked = set(tokenizer.all_special_ids) | ({tokenizer.unk_token_id} - {None})
    return {"special_ids": torch.tensor(sorted(never_masked), dtype=torch.long),
            "mask_token_id": int(tokenizer.mask_token_id), "vocab_size": len(tokenizer),
            "pad_id": tokenizer.pad_token_id, "unk_id": tokenizer.unk_token_id,
            "word_starts": word_start_table(tokenizer) if recipe.masking.whole_word else None}


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
                    device: torch.device | str, precision: str) -> dict[str, Any]:
    """score_sequences on an increment's held-out split (its checksum checked first), masked over the
    increment's own vocabulary like ``incr eval``."""
    inputs = tokenizer_inputs(tokenizer, recipe)
    inputs["vocab_size"] = int(ws.increment_manifest(increment_id).get("vocab_size") or inputs["vocab_size"])
    return score_sequences(head, read_heldout(ws, increment_id), increment_id=increment_id, recipe=recipe,
                           device=device, precision=precision, continues=heldout_words(ws, increment_id), **inputs)


def held_out_scores(model: torch.nn.Module, tokenizer: Any, ws: Workspace, increments: list[str], recipe: Recipe,
                    device: torch.device, precision: str) -> dict[str, dict[str, Any]]:
    """{increment: held-out loss, perplexity, accuracy} of ``model`` (the same masks as `incr eval`)."""
    head = MaskedLMHead(model)
    return {inc: {k: v for k, v in score_increment(head, ws, inc, recipe, tokenizer, device, precision).items()
                  if k in ("loss", "perplexity", "accuracy", "top5", "tokens")} for inc in increments}


# ----------------------------------------------------------------------------- the cache


def eval_settings(recipe: Recipe, precision: str) -> dict[str, Any]:
    """The settings that change a score (and so belong in the cache key and the results)."""
    return {"max_sequences": recipe.eval.max_sequences, "seed": recipe.eval.seed,
            "masking": dataclasses.asdict(recipe.masking), "precision": precision}


def weights_checksum(manifest: dict[str, Any]) -> str:
    """One sha256 over the checksums of a version's weight files, read from its manifest."""
    files = manifest.get("files") or {}
    weights = sorted((rel, rec.get("sha256")) for rel, rec in files.items()
                     if rel.endswith(".safetensors") and rel not in _NOT_WEIGHTS)
    if not weights:
        raise IntegrityError(f"{manifest.get('version', 'version')}: its manifest lists no safetensors weights; "
                             "restore the manifest")
    if len(weights) == 1:
        return str(weights[0][1])
    return hashlib.sha256(json.dumps(weights).encode()).hexdigest()


def cache_key(weights_sha: str, column: str, data_sha: str, settings: dict[str, Any]) -> str:
    blob = {"format": CACHE_FORMAT, "weights": weights_sha, "column": column, "data": data_sha, **settings}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


class ScoreCache:
    """One small JSON file per (version weights, column, settings) cell; unreadable files are misses."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder = folder
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def get(self, key: str | None) -> dict[str, Any] | None:
        """The cached scores of ``key`` (None: a cell that is never cached, counted as a miss)."""
        if self.enabled and key is not None:
            try:
                data = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
                scores = data["scores"]
                if data.get("key") == key and all(k in scores for k in SCORE_KEYS):
                    self.hits += 1
                    return {k: scores[k] for k in CELL_KEYS if k in scores}
            except (OSError, ValueError, KeyError, TypeError):
                pass
        self.misses += 1
        return None

    def put(self, key: str, scores: dict[str, Any], about: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with disk_writes("eval cache", self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / f"{key}.json", json.dumps({"key": key, **about, "scores": scores}) + "\n")


class ScoreBook:
    """Scores as facts about (weights checksum, increment, eval settings), kept in the eval cache:
    training writes the scores it computes, and its gate, ``incr eval`` and the model card read them,
    so no score is computed twice (e.g. a version's "before" is its parent's "after")."""

    def __init__(self, ws: Workspace, recipe: Recipe, precision: str):
        self.ws = ws
        self.settings = eval_settings(recipe, precision)
        self.cache = ScoreCache(ws.eval_dir / "cache")
        self._data: dict[str, str] = {}

    def key(self, weights_sha: str, increment: str) -> str:
        if increment not in self._data:
            self._data[increment] = _heldout_sha(self.ws, increment)
        return cache_key(weights_sha, increment, self._data[increment], self.settings)

    def get(self, weights_sha: str, increment: str) -> dict[str, Any] | None:
        return self.cache.get(self.key(weights_sha, increment))

    def put(self, weights_sha: str, version: str, increment: str, scores: dict[str, Any]) -> None:
        if all(k in scores for k in SCORE_KEYS):
            self.cache.put(self.key(weights_sha, increment), {k: scores[k] for k in CELL_KEYS if k in scores},
                           {"version": version, "column": increment, "settings": self.settings})


def gate_sample(ws: Workspace, recipe: Recipe, pending: list[str], earlier: list[str]) -> list[str]:
    """The increments the gate scores, in lineage order: all of them while their held-out rows fit
    in ``eval.gate_sequences``; beyond it the pending ones, the newest earlier ones up to half the
    budget, and older ones in a fixed order seeded by ``eval.seed`` up to the other half (at least
    one of each).

    The choice is nested from one version to the next (an older increment chosen now was chosen by
    the parent too, or was new or recent then), so the parent's "after" scores always cover the
    "before" scores a child needs.
    """
    budget = recipe.eval.gate_sequences
    rows = {d: min(int((ws.increment_manifest(d).get("sequences") or {}).get("heldout", 0)),
                   recipe.eval.max_sequences) for d in [*pending, *earlier]}
    if budget is None or sum(rows.values()) <= budget:
        return [*earlier, *pending]
    half, recent, used = budget // 2, [], 0
    for d in reversed(earlier):
        if recent and used + rows[d] > half:
            break
        recent.append(d)
        used += rows[d]
    older, used = [], 0
    for d in sorted((d for d in earlier if d not in recent), key=lambda d: stable_seed(recipe.eval.seed, d, -1)):
        if older and used + rows[d] > half:
            break
        older.append(d)
        used += rows[d]
    chosen = set(recent) | set(older)
    return [d for d in earlier if d in chosen] + list(pending)


# ----------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class VersionInfo:
    version: str
    parent: str | None
    status: str
    trained_on: list[str]
    new: list[str]
    pruned: bool = False  # gc removed its weights: only recorded scores remain


@dataclass(frozen=True)
class Column:
    """A column of the matrix: an ingested increment, or an ad-hoc text file (``--text``)."""

    id: str
    kind: str  # "increment" | "text"
    path: str | None = None


@dataclass
class EvalResult:
    """scores[version][column id] = {loss, perplexity, accuracy, top5, tokens}."""

    workspace: str
    versions: list[VersionInfo]
    columns: list[Column]
    scores: dict[str, dict[str, dict[str, Any]]]
    lineage: list[str]  # rows of the summaries: the final version's ancestors, oldest first
    latest: str | None
    learned_by: dict[str, str]  # increment -> the version of the lineage that trained on it
    summaries: dict[str, ContinualSummary]  # "perplexity", "accuracy"
    settings: dict[str, Any]
    cache_hits: int = 0
    cache_misses: int = 0
    seconds: float = 0.0
    drift: dict[str, dict[str, Any]] = field(default_factory=dict)  # version -> embedding drift from its parent
    tasks: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # version -> task -> scores (probe.py)
    task_summary: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> over the lineage
    task_settings: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def value(self, version: str, column: str, metric: str) -> float | None:
        return self.scores.get(version, {}).get(column, {}).get(metric)

    def increment_columns(self) -> list[str]:
        return [c.id for c in self.columns if c.kind == "increment"]

    def to_json(self) -> dict[str, Any]:
        """The document of ``--json``/``--out`` and of the copy under eval/ (standard JSON: no NaN)."""
        incs = self.increment_columns()
        doc = {"format": FORMAT_VERSION, "kind": "eval", "created": self.created, "incr_version": __version__,
               "workspace": self.workspace, "settings": self.settings,
               "versions": [dataclasses.asdict(v) for v in self.versions],
               "columns": [dataclasses.asdict(c) for c in self.columns],
               "matrix": self.scores, "lineage": self.lineage, "latest": self.latest,
               "learned_by": self.learned_by,
               "summaries": {m: s.to_dict(incs) for m, s in self.summaries.items()},
               "embedding_drift": self.drift,
               "tasks": {"settings": self.task_settings, "scores": self.tasks, "summary": self.task_summary},
               "cache": {"hits": self.cache_hits, "misses": self.cache_misses}, "seconds": round(self.seconds, 3)}
        return finite_json(doc)


def version_info(ws: Workspace, version: str) -> VersionInfo:
    m = ws.version_manifest(version)
    status = m.get("status") or ("promoted" if m.get("promoted") else "rejected")
    return VersionInfo(version, m.get("parent"), str(status), list(m.get("trained_on") or []), list(m.get("new") or []),
                       ws.pruned(version) is not None)


def select_versions(ws: Workspace, spec: str | None) -> list[str]:
    """``promoted`` (default: every base or promoted version), ``all`` (rejected ones too),
    ``latest``, or a comma list of versions (``v0001,v0003`` or ``1,3``) -> versions, oldest first."""
    spec = (spec or "promoted").strip()
    if spec == "all":
        return ws.versions()
    if spec == "promoted":  # a rejected version made LATEST by `incr promote` counts as promoted
        by_hand = {m.get("to") for m in ws.history() if m.get("command") == "promote"}
        return [v for v in ws.versions() if version_info(ws, v).status in ("base", "promoted") or v in by_hand]
    if spec in ("latest", "LATEST"):
        return [ws.latest()]
    chosen = [ws.resolve_version(s) for s in spec.split(",") if s.strip()]
    if not chosen:
        raise UsageError(f"--versions {shown(spec)}: name versions (e.g. v0001,v0002), latest, promoted or all")
    return sorted(set(chosen), key=lambda v: int(v[1:]))


def select_increments(ws: Workspace, spec: str | None) -> list[str]:
    """``all`` (default) or a comma list of increment ids / dNNNN prefixes -> increments, oldest first."""
    spec = (spec or "all").strip()
    if spec == "all":
        return ws.increments()
    chosen = ws.resolve_increments([s.strip() for s in spec.split(",") if s.strip()])
    order = ws.increments()
    return sorted(set(chosen), key=order.index)


def lineage_summaries(ws: Workspace, final: str, columns: list[str], scores: dict[str, dict[str, dict[str, Any]]]
                      ) -> tuple[list[str], dict[str, str], dict[str, ContinualSummary]]:
    """Summaries over ``final``'s lineage (rows not scored are NaN)
    -> (lineage, {increment: version that learned it}, {metric: summary})."""
    lineage = ws.lineage(final)
    learned_by = {inc: v for v in lineage for inc in version_info(ws, v).new}
    learned_at = [lineage.index(learned_by[c]) if c in learned_by else -1 for c in columns]
    reference = not ws.version_manifest(lineage[0]).get("head_initialised", False)
    out = {}
    for metric, higher in (("perplexity", False), ("accuracy", True)):
        R = np.full((len(lineage), len(columns)), np.nan)
        for i, v in enumerate(lineage):
            for j, c in enumerate(columns):
                x = scores.get(v, {}).get(c, {}).get(metric)
                R[i, j] = np.nan if x is None else x
        out[metric] = summarize(R, learned_at, higher_is_better=higher, reference=reference)
    return lineage, learned_by, out


def evaluate(ws: Workspace, versions: Sequence[str], increments: Sequence[str], recipe: Recipe, *,
             texts: Sequence[str | Path] | None = None, device: str | torch.device | None = None,
             reporter: Reporter | None = None, use_cache: bool = True) -> EvalResult:
    """Score every version on every increment's held-out split (and on ``texts``) -> EvalResult.

    ``versions`` and ``increments`` are resolved names (see select_versions / select_increments);
    ``device`` defaults to ``recipe.runtime.device``. Cells found in the cache load nothing; a
    version's model is loaded (checksums verified) only when one of its cells is missing.
    Summaries follow the lineage of LATEST when it is among ``versions``, else of the last one.
    """
    reporter = reporter or Quiet()
    started = time.monotonic()
    dev = resolve_device(str(device) if device is not None else recipe.runtime.device)
    precision = resolve_precision(recipe.runtime.precision, dev)
    settings = eval_settings(recipe, precision)
    cache = ScoreCache(ws.eval_dir / "cache", enabled=use_cache)
    if not versions:
        raise UsageError(f"{ws.root}: no versions to score; valid versions: {', '.join(ws.versions()) or 'none'}")
    infos = [version_info(ws, v) for v in versions]
    columns = [Column(d, "increment") for d in increments]
    text_docs = {f"text:{label}": (path, docs) for label, path, docs in _read_texts(texts or [], recipe)}
    columns += [Column(col_id, "text", path) for col_id, (path, _) in text_docs.items()]
    if not columns:
        raise UsageError(f"{ws.root}: no data to score; ingest an increment (`incr ingest`) or pass --text FILE")

    data_sha = {d: _heldout_sha(ws, d) for d in increments}
    scores, todo = _cached_cells(ws, infos, columns, data_sha, settings, cache)
    if todo:
        _score_cells(ws, todo, scores, recipe, dev, precision, text_docs, settings, cache, reporter)

    scores = {v: {c.id: scores[v][c.id] for c in columns} for v in scores}  # column order, hit or not
    names = [i.version for i in infos]
    latest = ws.latest()
    final = latest if latest in names else names[-1]
    lineage, learned_by, summaries = lineage_summaries(ws, final, list(increments), scores)
    return EvalResult(str(ws.root), infos, columns, scores, lineage, latest, learned_by, summaries,
                      {**settings, "device": str(dev), "batch_size": recipe.eval.batch_size},
                      cache.hits, cache.misses, time.monotonic() - started, recorded_drift(ws, names))


def recorded_drift(ws: Workspace, versions: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{version: the embedding drift from its parent that training recorded in metrics.json}, for the
    versions that have one (a base has none; versions trained before incr measured it neither)."""
    out = {}
    for version in versions:
        try:
            metrics = json.loads((ws.version_dir(version) / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        drift = metrics.get("embedding_drift") if isinstance(metrics, dict) else None
        if isinstance(drift, dict) and isinstance(drift.get("all"), dict):
            out[version] = drift
    return out


def _known_cell(cache: ScoreCache, key: str | None, recorded: dict[str, Any], pruned: bool) -> dict[str, Any] | None:
    """A cell's scores without scoring: from the cache, from a pruned version's ``pruned.json``, or
    empty for a pruned version (no weights left to score with); None: it must be scored."""
    if key in recorded:
        cache.hits += 1
        return dict(recorded[key])
    hit = cache.get(key)
    return dict.fromkeys(SCORE_KEYS) if hit is None and pruned else hit


Cells = dict[str, list[tuple[Column, str | None]]]  # version -> the cells to score, with their cache keys


def _cached_cells(ws: Workspace, infos: list[VersionInfo], columns: list[Column], data_sha: dict[str, str],
                  settings: dict[str, Any], cache: ScoreCache) -> tuple[dict[str, dict[str, dict[str, Any]]], Cells]:
    """-> (the scores known already: cached, or recorded for a pruned version; the cells still to
    score), every version's checksums verified."""
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    todo: Cells = {}
    with ws.verifying_many():  # one write of the verify cache for all versions
        for info in infos:
            # Checked even when every cell is cached: a damaged version is named, never silently scored.
            # Unchanged files are not hashed again (the workspace's stat-keyed sha256 cache).
            weights = weights_checksum(ws.verify_version(info.version))
            recorded = (ws.pruned(info.version) or {}).get("scores") or {} if info.pruned else {}
            row = scores.setdefault(info.version, {})
            for col in columns:
                # ad-hoc text is scored every time: it has no checksummed file to key the cache on
                key = cache_key(weights, col.id, data_sha[col.id], settings) if col.kind == "increment" else None
                hit = _known_cell(cache, key, recorded, info.pruned)
                if hit is not None:
                    row[col.id] = hit
                else:
                    todo.setdefault(info.version, []).append((col, key))
    return scores, todo


def _score_cells(ws: Workspace, todo: Cells, scores: dict[str, dict[str, dict[str, Any]]], recipe: Recipe,
                 dev: torch.device, precision: str, text_docs: dict[str, tuple[str, list[str]]],
                 settings: dict[str, Any], cache: ScoreCache, reporter: Reporter) -> None:
    """Load each version of ``todo`` once and score its cells into ``scores`` (and the cache)."""
    from incr_cli import models  # transformers is imported only when a model is needed
    from incr_cli.device import configure_threads

    configure_threads(recipe.runtime.num_threads)
    total = sum(len(cells) for cells in todo.values())
    heldout: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}  # read (and checksummed) once per increment
    with reporter.progress("scoring", total=total, unit="cells") as bar:
        for version, cells in todo.items():
            model, tokenizer = models.load_version(ws, version, recipe=recipe, device=str(dev))
            head = MaskedLMHead(model)
            inputs = tokenizer_inputs(tokenizer, recipe)
            revision = vocab.version_revision(ws, version, tokenizer)
            for col, key in cells:
                args = dict(inputs)
                if col.kind == "increment":
                    args.update(vocab.scoring_vocab(
                        ws.increment_manifest(col.id), col.id, revision, "its scores would be meaningless: leave "
                        "it out with --data or that version with --versions"))
                    if col.id not in heldout:
                        heldout[col.id] = (read_heldout(ws, col.id), heldout_words(ws, col.id))
                    ids, words = heldout[col.id]
                else:
                    ids, words = _pack_texts(text_docs[col.id][1], tokenizer, recipe.model.max_seq_len), None
                result = score_sequences(head, ids, increment_id=col.id, recipe=recipe, device=dev,
                                         precision=precision, continues=words, **args)
                scores[version][col.id] = result
                if key:
                    cache.put(key, result, {"version": version, "column": col.id, "settings": settings})
                bar.advance(1, f"{version} {col.id}")
            del head, model  # one model in memory at a time
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def _heldout_sha(ws: Workspace, increment_id: str) -> str:
    record = (ws.increment_manifest(increment_id).get("files") or {}).get("heldout.bin") or {}
    if not record.get("sha256"):
        raise IntegrityError(f"{ws.increment_dir(increment_id) / 'manifest.json'}: lists no heldout.bin; "
                             "remove the folder and ingest again")
    return str(record["sha256"])


def save_result(ws: Workspace, result: EvalResult, out: Path | None = None) -> Path:
    """Write the JSON document to ``WORKSPACE/eval/<UTC time>.json`` (atomically; never overwrites
    an earlier result) and to ``out`` when given -> the path of the copy under eval/."""
    text = json.dumps(result.to_json(), indent=2) + "\n"
    ws.eval_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = ws.eval_dir / f"{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = ws.eval_dir / f"{stamp}-{n}.json"
    atomic_write_text(path, text, what="eval result")
    if out is not None:
        out = Path(out)
        if out.parent and not out.parent.is_dir():
            raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
        atomic_write_text(out, text, what=f"eval result --out {out.name}")
    return path


# ----------------------------------------------------------------------------- ad-hoc text (--text)


def _read_texts(paths: Sequence[str | Path], recipe: Recipe) -> list[tuple[str, str, list[str]]]:
    """Each --text FILE -> (label, path, documents), read and cleaned exactly as ingest does."""
    from incr_cli.ingest import clean_documents

    out = []
    labels: set[str] = set()
    for spec in paths:
        docs, tally = clean_documents(str(spec), fmt="auto", text_field="text", recipe=recipe)
        if not docs:
            reasons = ", ".join(f"{r}: {n}" for r, n in (tally.files + tally.docs).items()) or "no text"
            raise UsageError(f"--text {clip(str(spec))}: nothing to score ({reasons})")
        label = Path(str(spec)).name or str(spec)
        while label in labels:  # two files with the same name stay two columns
            label += "'"
        labels.add(label)
        out.append((label, str(spec), docs))
    return out


def _pack_texts(docs: list[str], tokenizer: Any, seq_len: int) -> np.ndarray:
    """Tokenize and pack documents with ingest's own writer (into a temporary file outside the
    workspace, removed at once) -> (n, seq_len) int64, the rows ingest would have written."""
    from incr_cli.ingest import PackedWriter, _special_ids, token_dtype, tokenize_batch

    cls_id, sep_id, pad_id = _special_ids(tokenizer)
    with tempfile.TemporaryDirectory(prefix="incr-eval-text-") as tmp:
        path = Path(tmp) / "text.bin"
        writer = PackedWriter(path, seq_len, cls_id=cls_id, sep_id=sep_id, pad_id=pad_id,
                              dtype=token_dtype(len(tokenizer)))
        writer.add([ids for ids in tokenize_batch(tokenizer, docs) if ids])
        writer.close()
        return np.fromfile(path, dtype=writer.dtype).reshape(-1, seq_len).astype(np.int64)
