"""A version as a feature extractor: text embeddings, and how far a new version moves them.

An embedding is the encoder's last hidden state pooled over a text's tokens: ``mean`` over every
non-padding token ([CLS] and [SEP] included, as sentence-transformers pools) or the ``cls`` token's
vector, then L2-normalised, so a dot product of two embeddings is their cosine similarity. The
encoder is the masked-LM model's backbone (``model.base_model``): the vocabulary head is never run.

Drift between two versions is measured on the same texts embedded by both:
- mean cosine: the mean over texts of cos(e_old(x), e_new(x)); 1 = unchanged. It says whether a
  query embedded with the new version can be matched against an index built with the old one.
- neighbour overlap at k: for each text, the share of its k nearest neighbours (by cosine, among
  the same set of texts, itself excluded) that are the same under both versions; 1 = every ranking
  kept. It says how much search results change once everything is re-embedded.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from incr_cli.config.recipe import Recipe
from incr_cli.data.clean import clean_documents
from incr_cli.data.shards import IncrementShards
from incr_cli.errors import InputError, UsageError
from incr_cli.model.packaging import declared_pooling
from incr_cli.model.weights import load_version
from incr_cli.progress import ProgressLike, Quiet, Reporter
from incr_cli.runtime.device import CPU, Placement, inference
from incr_cli.store.files import atomic_write_bytes
from incr_cli.store.workspace import Workspace

POOLINGS = ("mean", "cls")
NEIGHBOURS = 10  # k of the neighbour overlap
SPEED_ROUNDS = 3  # models timed in turns, best round of each: less sensitive to other jobs' load


# ----------------------------------------------------------------------------- pure functions


def pool(hidden: torch.Tensor, attention: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden (B, T, H), attention (B, T) bool/int -> L2-normalised (B, H) float32 embeddings."""
    hidden = hidden.float()
    if pooling == "cls":
        pooled = hidden[:, 0]  # (B, H)
    elif pooling == "mean":
        weights = attention.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, H)
    else:
        raise UsageError(f"pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    return torch.nn.functional.normalize(pooled, dim=-1)


def neighbours(emb: np.ndarray, k: int) -> np.ndarray:
    """emb (N, H) L2-normalised -> (N, k) indices of each row's k most similar other rows.

    Ties are broken by the lower index (a stable sort), so equal inputs give equal neighbours."""
    sim = emb @ emb.T  # (N, N)
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def embedding_drift(before: np.ndarray, after: np.ndarray, k: int = NEIGHBOURS) -> dict[str, Any]:
    """How far ``after`` moved from ``before``: both (N, H), row i the same text, L2-normalised.

    -> {n, mean_cosine, neighbour_overlap, k}: mean cosine of each text's two embeddings, and the
    mean share of each text's k nearest neighbours (among the N texts) that both versions agree on.
    k shrinks to N - 1 for small sets; neighbour_overlap is None with fewer than 2 texts, every
    value None with none.
    """
    if before.shape != after.shape:
        raise ValueError(f"embedding_drift: shapes differ, {before.shape} vs {after.shape}")
    n = int(before.shape[0])
    if n == 0:
        return {"n": 0, "mean_cosine": None, "neighbour_overlap": None, "k": 0}
    cosine = float(np.mean(np.sum(before.astype(np.float64) * after.astype(np.float64), axis=1)))
    k_used = min(k, n - 1)
    overlap = None
    if k_used > 0:
        nb, na = neighbours(before, k_used), neighbours(after, k_used)
        shared = [len(set(b).intersection(a)) for b, a in zip(nb.tolist(), na.tolist())]
        overlap = float(np.mean(shared)) / k_used
    return {"n": n, "mean_cosine": cosine, "neighbour_overlap": overlap, "k": k_used}


# ----------------------------------------------------------------------------- embedding


def encoder_of(model: nn.Module) -> nn.Module:
    """The backbone of a masked-LM model (BertModel inside BertForMaskedLM, ...): no vocabulary head."""
    return getattr(model, "base_model", model)


@dataclass(frozen=True)
class EmbedSettings:
    """How texts become embeddings: the pooling (see ``pool``), texts per forward pass, and the
    tokens a text is cut to."""
    pooling: str = "mean"
    batch_size: int = 64
    max_length: int = 512


def embed_ids(model: nn.Module, input_ids: torch.Tensor, attention: torch.Tensor, *,
              settings: EmbedSettings = EmbedSettings(), place: Placement = CPU,
              progress: ProgressLike | None = None) -> np.ndarray:
    """input_ids (N, T) long, attention (N, T) -> (N, H) float32 L2-normalised embeddings, row for row.

    The model's training flag is restored afterwards; ``progress`` advances by rows embedded."""
    encoder = encoder_of(model)
    chunks = []
    step = settings.batch_size
    with inference(model):
        for start in range(0, input_ids.shape[0], step):
            ids = input_ids[start:start + step].to(place.device)
            mask = attention[start:start + step].to(place.device)
            with place.autocast():
                hidden = encoder(input_ids=ids, attention_mask=mask.long(), return_dict=True).last_hidden_state
            chunks.append(pool(hidden, mask, settings.pooling).cpu().numpy())  # (b, H)
            if progress is not None:
                progress.advance(len(ids))
    hidden_size = int(getattr(model.config, "hidden_size", getattr(model.config, "dim", 0)))
    return np.concatenate(chunks) if chunks else np.zeros((0, hidden_size), np.float32)


def embed_texts(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, settings: EmbedSettings,
                place: Placement = CPU, progress: ProgressLike | None = None) -> tuple[np.ndarray, int]:
    """texts -> ((N, H) embeddings in the order of ``texts``, how many were cut to ``settings.max_length`` tokens).

    Texts are batched by length (fewer pad tokens), and the rows put back in input order."""
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True, truncation=False,
                                             verbose=False)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    rows = np.empty((len(texts), 0), np.float32)
    parts = []
    for start in range(0, len(texts), settings.batch_size):
        picked = [texts[i] for i in order[start:start + settings.batch_size]]
        enc = tokenizer(picked, padding=True, truncation=True, max_length=settings.max_length, return_tensors="pt")
        parts.append(embed_ids(model, enc["input_ids"], enc["attention_mask"], settings=settings, place=place,
                               progress=progress))
    if parts:
        sorted_rows = np.concatenate(parts)
        rows = np.empty_like(sorted_rows)
        rows[order] = sorted_rows
    return rows, sum(n > settings.max_length for n in lengths)


def encoder_speed(models: dict[str, nn.Module], ids: torch.Tensor, pad_id: int, *, batch_size: int,
                  device: torch.device) -> dict[str, float]:
    """Inference tokens/s of each model's encoder (feature extraction, no vocabulary head) on ids (N, T).

    One warm-up batch each; then the models take turns ``SPEED_ROUNDS`` times and each keeps its best
    round, so a burst of load from other processes hurts both alike or neither."""
    attention = ids != pad_id
    tokens = int(attention.sum())
    best = {name: 0.0 for name in models}
    settings, place = EmbedSettings(batch_size=batch_size), Placement(device)
    for model in models.values():
        embed_ids(model, ids[:batch_size], attention[:batch_size], settings=settings, place=place)
    for _ in range(SPEED_ROUNDS):
        for name, model in models.items():
            start = time.perf_counter()
            embed_ids(model, ids, attention, settings=settings, place=place)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = max(best[name], tokens / (time.perf_counter() - start))
    return best


# ----------------------------------------------------------------------------- drift of a new version


def heldout_embeddings(model: nn.Module, shards: dict[str, IncrementShards], recipe: Recipe, *,
                       place: Placement) -> dict[str, np.ndarray]:
    """{increment: (n, H) embeddings of its first ``drift.max_sequences`` held-out rows} (empty splits left out)."""
    out = {}
    settings = EmbedSettings(recipe.drift.pooling, recipe.eval.batch_size)
    for inc, shard in shards.items():
        rows = np.asarray(shard.heldout[: recipe.drift.max_sequences])
        if rows.ndim != 2 or rows.shape[0] == 0:
            continue
        ids = torch.from_numpy(rows.astype(np.int64))  # (n, T)
        out[inc] = embed_ids(model, ids, ids != shard.pad_id, settings=settings, place=place)
    return out


def version_drift(model: nn.Module, parent: Callable[[], nn.Module], shards: dict[str, IncrementShards],
                  recipe: Recipe, *, place: Placement) -> dict[str, Any] | None:
    """Embedding drift of ``model`` (the new version) from its parent on the held-out rows of ``shards``.
    ``parent()`` loads the parent as the new version reads text (a grown vocabulary's new tokens
    through the rows it would have started them with); it is called only when there is drift to measure.

    -> {pooling, max_sequences, increments: {id: drift}, all: drift over every row together}
    (see ``embedding_drift``), or None when ``drift.max_sequences`` is 0 or nothing is held out.
    """
    if recipe.drift.max_sequences == 0:
        return None
    after = heldout_embeddings(model, shards, recipe, place=place)
    if not after:
        return None
    parent_model = parent()
    before = heldout_embeddings(parent_model, {inc: shards[inc] for inc in after}, recipe, place=place)
    del parent_model
    per = {inc: _rounded(embedding_drift(before[inc], after[inc])) for inc in after}
    pooled = embedding_drift(np.concatenate(list(before.values())), np.concatenate(list(after.values())))
    return {"pooling": recipe.drift.pooling, "max_sequences": recipe.drift.max_sequences,
            "increments": per, "all": _rounded(pooled)}


def drift_checks(recipe: Recipe, drift: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Gate checks of ``gate.max_embedding_drift``: one per increment, value = 1 - mean cosine."""
    limit = recipe.gate.max_embedding_drift
    if limit is None or drift is None:
        return []
    checks = []
    for inc, d in drift["increments"].items():
        value = None if d["mean_cosine"] is None else round(1.0 - d["mean_cosine"], 6)
        checks.append({"check": "max_embedding_drift", "increment": inc, "value": value, "limit": limit,
                       "passed": value is not None and value <= limit})
    return checks


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()}


# ----------------------------------------------------------------------------- incr embed


@dataclass
class EmbedResult:
    out: Path
    version: str
    rows: int
    dim: int
    pooling: str
    truncated: int
    seconds: float
    files: list[dict[str, Any]] = field(default_factory=list)  # {path, first_row, rows}

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "version": self.version, "rows": self.rows, "dim": self.dim,
                "pooling": self.pooling, "truncated": self.truncated, "seconds": round(self.seconds, 3),
                "files": self.files}


def read_inputs(paths: Sequence[str], *, fmt: str, text_field: str, recipe: Recipe) -> tuple[list[str], list[dict[str, Any]]]:
    """Documents of every INPUT in argument order -> (texts, [{path, first_row, rows}] per INPUT).

    An INPUT that yields no document is an InputError naming it and why."""
    texts: list[str] = []
    files = []
    for spec in paths:
        docs, tally = clean_documents(spec, fmt=fmt, text_field=text_field, recipe=recipe)
        if not docs:
            reasons = ", ".join(f"{r}: {n}" for r, n in (tally.files + tally.docs).items()) or "no documents"
            raise InputError(f"nothing to embed in {spec} ({reasons}); check the path, --format and --text-field")
        files.append({"path": spec, "first_row": len(texts), "rows": len(docs)})
        texts.extend(docs)
    return texts, files


@dataclass(frozen=True)
class EmbedRequest:
    """``incr embed``'s job: the INPUTs (read as ingest reads them: ``fmt``, ``text_field``), the .npy
    to write, the pooling (None: the one the version's sentence-transformers packaging declares, else
    mean) and texts per forward pass."""
    inputs: Sequence[str]
    out: Path
    fmt: str = "auto"
    text_field: str = "text"
    pooling: str | None = None
    batch_size: int = 64


def embed_files(ws: Workspace, version: str, request: EmbedRequest, *, recipe: Recipe,
                reporter: Reporter | None = None) -> EmbedResult:
    """Embed the documents of ``request.inputs`` with ``version`` on ``recipe.runtime``'s device and
    write them to ``request.out`` (.npy, atomically).

    Row i is the i-th document: INPUTs in argument order, a folder's files sorted, documents in
    file order (as ``incr ingest`` reads them, without its dedup or held-out split)."""
    reporter = reporter or Quiet()
    pooling, out = request.pooling, Path(request.out)
    if pooling is None:
        declared = declared_pooling(ws.version_dir(version))
        pooling = declared.mode if declared else "mean"
    if pooling not in POOLINGS:
        raise UsageError(f"--pooling {pooling}: use one of {', '.join(POOLINGS)}")
    if out.suffix != ".npy":
        raise UsageError(f"--out {out}: name a .npy file (numpy.load reads it)")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    started = time.perf_counter()
    texts, files = read_inputs(request.inputs, fmt=request.fmt, text_field=request.text_field, recipe=recipe)
    place = Placement.resolve(recipe.runtime.device, "fp32")
    model, tokenizer = load_version(ws, version, recipe=recipe, device=str(place.device))
    settings = EmbedSettings(pooling, request.batch_size, recipe.model.max_seq_len)
    with reporter.progress(f"embedding with {version}", total=len(texts), unit="texts") as bar:
        rows, truncated = embed_texts(model, tokenizer, texts, settings=settings, place=place, progress=bar)
    buffer = io.BytesIO()
    np.save(buffer, rows.astype(np.float32), allow_pickle=False)
    atomic_write_bytes(out, buffer.getvalue())
    return EmbedResult(out, version, int(rows.shape[0]), int(rows.shape[1]), pooling, truncated,
                       time.perf_counter() - started, files)


__all__ = ["POOLINGS", "pool", "embedding_drift", "EmbedSettings", "embed_ids", "embed_texts", "EmbedRequest",
           "embed_files", "EmbedResult",
           "version_drift", "drift_checks"]
