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

import datetime as _dt
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from incr_cli.config.recipe import Recipe
from incr_cli.data.clean import clean_documents
from incr_cli.data.packing import PackedWriter, special_ids, token_dtype, tokenize_batch
from incr_cli.errors import UsageError, clip, shown
from incr_cli.model import vocab
from incr_cli.model import weights as models
from incr_cli.model.heads import MaskedLMHead
from incr_cli.progress import Quiet, Reporter
from incr_cli.runtime.device import Placement, configure_threads
from incr_cli.scoring.cache import ScoreCache, cache_key, eval_settings, heldout_sha, weights_checksum
from incr_cli.scoring.continual import ContinualSummary, summarize
from incr_cli.scoring.result import Column, EvalResult, VersionInfo
from incr_cli.scoring.score import SCORE_KEYS, HeldOut, heldout_words, read_heldout, score_sequences
from incr_cli.store.files import NOT_WRITABLE, atomic_write_text
from incr_cli.store.workspace import Workspace
from incr_cli.training.masking import tokenizer_inputs


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


@dataclass(frozen=True)
class EvalGrid:
    """What ``evaluate`` scores: every version (resolved names, see select_versions) on every increment's
    held-out split (see select_increments) and on every ad-hoc ``texts`` file (read as ingest reads it)."""
    versions: Sequence[str]
    increments: Sequence[str] = ()
    texts: Sequence[str | Path] = ()


def evaluate(ws: Workspace, grid: EvalGrid, recipe: Recipe, *, reporter: Reporter | None = None,
             use_cache: bool = True) -> EvalResult:
    """Score ``grid`` (versions x increments and texts) -> EvalResult, on ``recipe.runtime``'s device.

    Cells found in the cache load nothing; a version's model is loaded (checksums verified) only when
    one of its cells is missing. Summaries follow the lineage of LATEST when it is among the versions,
    else of the last one.
    """
    reporter = reporter or Quiet()
    started = time.monotonic()
    place = Placement.resolve(recipe.runtime.device, recipe.runtime.precision)
    settings = eval_settings(recipe, place.precision)
    cache = ScoreCache(ws.eval_dir / "cache", enabled=use_cache)
    if not grid.versions:
        raise UsageError(f"{ws.root}: no versions to score; valid versions: {', '.join(ws.versions()) or 'none'}")
    infos = [version_info(ws, v) for v in grid.versions]
    increments = list(grid.increments)
    columns = [Column(d, "increment") for d in increments]
    text_docs = {f"text:{label}": (path, docs) for label, path, docs in _read_texts(grid.texts, recipe)}
    columns += [Column(col_id, "text", path) for col_id, (path, _) in text_docs.items()]
    if not columns:
        raise UsageError(f"{ws.root}: no data to score; ingest an increment (`incr ingest`) or pass --text FILE")

    data_sha = {d: heldout_sha(ws, d) for d in increments}
    scores, todo = _cached_cells(ws, infos, columns, data_sha, settings, cache)
    if todo:
        job = _Scoring(ws, recipe, place, settings, cache, text_docs)
        _score_cells(job, todo, scores, reporter)

    scores = {v: {c.id: scores[v][c.id] for c in columns} for v in scores}  # column order, hit or not
    names = [i.version for i in infos]
    latest = ws.latest()
    final = latest if latest in names else names[-1]
    lineage, learned_by, summaries = lineage_summaries(ws, final, increments, scores)
    return EvalResult(str(ws.root), infos, columns, scores, lineage, latest, learned_by, summaries,
                      {**settings, "device": str(place.device), "batch_size": recipe.eval.batch_size},
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


@dataclass(frozen=True)
class _Scoring:
    """What scoring the missing cells needs: where, with which settings, into which cache, and the
    ad-hoc texts' documents ({column id: (path, documents)})."""
    ws: Workspace
    recipe: Recipe
    place: Placement
    settings: dict[str, Any]
    cache: ScoreCache
    text_docs: dict[str, tuple[str, list[str]]]


def _score_cells(job: _Scoring, todo: Cells, scores: dict[str, dict[str, dict[str, Any]]], reporter: Reporter) -> None:
    """Load each version of ``todo`` once and score its cells into ``scores`` (and the cache)."""
    ws, recipe = job.ws, job.recipe
    configure_threads(recipe.runtime.num_threads)
    total = sum(len(cells) for cells in todo.values())
    heldout: dict[str, HeldOut] = {}  # read (and checksummed) once per increment
    with reporter.progress("scoring", total=total, unit="cells") as bar:
        for version, cells in todo.items():
            model, tokenizer = models.load_version(ws, version, recipe=recipe, device=str(job.place.device))
            head = MaskedLMHead(model)
            inputs = tokenizer_inputs(tokenizer, recipe)
            revision = vocab.version_revision(ws, version, tokenizer)
            for col, key in cells:
                tokens, limits = inputs, vocab.NO_LIMITS
                if col.kind == "increment":
                    size, limits = vocab.scoring_vocab(
                        ws.increment_manifest(col.id), col.id, revision, "its scores would be meaningless: leave "
                        "it out with --data or that version with --versions")
                    tokens = inputs.of_vocab(size)
                    if col.id not in heldout:
                        heldout[col.id] = HeldOut(col.id, read_heldout(ws, col.id), heldout_words(ws, col.id))
                    rows = heldout[col.id]
                else:
                    rows = HeldOut(col.id, _pack_texts(job.text_docs[col.id][1], tokenizer, recipe.model.max_seq_len))
                result = score_sequences(head, rows, recipe=recipe, tokens=tokens, place=job.place, limits=limits)
                scores[version][col.id] = result
                if key:
                    job.cache.put(key, result, {"version": version, "column": col.id, "settings": job.settings})
                bar.advance(1, f"{version} {col.id}")
            del head, model  # one model in memory at a time
            if job.place.device.type == "cuda":
                torch.cuda.empty_cache()


def save_result(ws: Workspace, result: EvalResult, out: Path | None = None) -> Path | None:
    """Write the JSON document to ``WORKSPACE/eval/<UTC time>.json`` (atomically; never overwrites
    an earlier result) and to ``out`` when given -> the path of the copy under eval/, or None when
    the workspace is read-only (``out`` is written all the same)."""
    text = json.dumps(result.to_json(), indent=2) + "\n"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path: Path | None = ws.eval_dir / f"{stamp}.json"
    try:
        ws.eval_dir.mkdir(parents=True, exist_ok=True)
        n = 1
        while path.exists():
            n += 1
            path = ws.eval_dir / f"{stamp}-{n}.json"
        atomic_write_text(path, text, what="eval result")
    except OSError as exc:
        if exc.errno not in NOT_WRITABLE:
            raise
        path = None
    if out is not None:
        out = Path(out)
        if out.parent and not out.parent.is_dir():
            raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
        atomic_write_text(out, text, what=f"eval result --out {out.name}")
    return path


# ----------------------------------------------------------------------------- ad-hoc text (--text)


def _read_texts(paths: Sequence[str | Path], recipe: Recipe) -> list[tuple[str, str, list[str]]]:
    """Each --text FILE -> (label, path, documents), read and cleaned exactly as ingest does."""
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
    cls_id, sep_id, pad_id = special_ids(tokenizer)
    with tempfile.TemporaryDirectory(prefix="incr-eval-text-") as tmp:
        path = Path(tmp) / "text.bin"
        writer = PackedWriter(path, seq_len, cls_id=cls_id, sep_id=sep_id, pad_id=pad_id,
                              dtype=token_dtype(len(tokenizer)))
        writer.add([ids for ids in tokenize_batch(tokenizer, docs) if ids])
        writer.close()
        return np.fromfile(path, dtype=writer.dtype).reshape(-1, seq_len).astype(np.int64)
