"""A version judged by its downstream tasks: embed a task's texts, score them, cache the scores, gate.

``score_task`` embeds a task's texts once with a model (``embed.embed_texts``: the last hidden layer,
``probe.pooling``, L2-normalised) and scores them (``tasks.py``). ``TaskBook`` keeps scores as facts
about (weights checksum, task file checksum and fields, probe settings, precision) in
``WS/eval/tasks/``, so a version's task scores are computed once: training writes the parent's and
the new version's, and ``incr eval``, ``incr probe``, ``incr status`` and the next increment read them.
``task_gate_checks`` is the task gate: a task's main score may not drop from the parent's by more
than its margin, unless the paired bootstrap interval of the change still holds zero (noise).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from incr_cli.config.recipe import Recipe, TaskConfig
from incr_cli.errors import IncrError, InputError
from incr_cli.progress import Quiet, Reporter
from incr_cli.scoring import tasks as T
from incr_cli.store.files import atomic_write_text
from incr_cli.store.workspace import Workspace

if TYPE_CHECKING:  # torch is imported only where a model runs: `incr status` reads recorded scores
    from incr_cli.runtime.device import Placement

CACHE_FORMAT = 1
SHOWN = {"classification": ("accuracy", "accuracy_ci", "macro_f1", "macro_f1_ci", "fold_accuracy", "classes",
                            "chance", "examples"),
         "retrieval": ("recall@1", "recall@10", "mrr", "mrr_ci", "candidates", "examples")}


def load_tasks(recipe: Recipe) -> list[T.TaskData]:
    """Every recipe task read and checked (InputError, exit 2, on the first bad one): before training."""
    return [T.read_task(spec, recipe.probe) for spec in recipe.eval.tasks]


def probe_settings(recipe: Recipe, precision: str) -> dict[str, Any]:
    """The settings that change a task score (the cache key, and what metrics.json records)."""
    p = recipe.probe
    return {"folds": p.folds, "C": p.C, "max_iter": p.max_iter, "max_examples": p.max_examples,
            "max_length": p.max_length, "pooling": p.pooling, "seed": p.seed, "bootstrap": p.bootstrap,
            "precision": precision, "probe": "sklearn LogisticRegression on StandardScaler, out-of-fold"}


def shown(scores: dict[str, Any]) -> dict[str, Any]:
    """A task score as tables and metrics.json show it: without the per-example values."""
    return {k: v for k, v in scores.items() if k != "per_example"}


def main_score(scores: dict[str, Any] | None) -> float | None:
    return None if not scores else scores.get(T.MAIN.get(scores.get("kind", ""), ""))


# ----------------------------------------------------------------------------- scoring


def unknown_share(tokenizer: Any, texts: Sequence[str]) -> float:
    """Share of the texts' tokens the tokenizer maps to [UNK] (0 when it has no unknown token)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not texts:
        return 0.0
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    total = sum(len(x) for x in ids)
    return sum(x.count(unk) for x in ids) / total if total else 0.0


def score_task(model: Any, tokenizer: Any, data: T.TaskData, recipe: Recipe, *, place: Placement | None = None,
               reporter: Reporter | None = None) -> dict[str, Any]:
    """Embed ``data``'s texts (and queries) with ``model`` once (on ``place``, default the CPU in fp32) and
    score them -> the task's scores, with the pooling, the share of texts cut to ``probe.max_length``
    and the seconds it took."""
    from incr_cli.runtime.device import CPU
    from incr_cli.scoring.embed import EmbedSettings, embed_texts

    reporter = reporter or Quiet()
    started = time.perf_counter()
    p = recipe.probe
    limit = int(getattr(model.config, "max_position_embeddings", p.max_length) or p.max_length)
    length = min(p.max_length, limit)
    everything = data.texts + data.queries
    unk = unknown_share(tokenizer, everything)
    if unk > recipe.data.unknown_warn:
        reporter.warn(f"task {data.name!r}: {unk:.1%} of its tokens are unknown ([UNK]) to this version's "
                      "tokenizer; its scores say little about this model")
    emb, cut = embed_texts(model, tokenizer, everything, settings=EmbedSettings(p.pooling, p.batch_size, length),
                           place=place or CPU)
    texts = emb[:len(data.texts)]
    if data.spec.kind == "retrieval":
        scores = T.retrieval_scores(emb[len(data.texts):], texts, data.positive, p)
    else:
        scores = T.classification_scores(texts, data.labels, data.groups, p)
    return {"kind": data.spec.kind, **scores, "pooling": p.pooling, "max_length": length,
            "cut": cut / max(1, len(everything)), "unknown": unk, "seconds": round(time.perf_counter() - started, 3)}


def probing(version: str, data: T.TaskData) -> str:
    """The log line before a version is probed on a task."""
    return f"probing {version or 'the model'} on task {data.name} ({len(data.texts) + len(data.queries):,} texts)"


class TaskBook:
    """Task scores as facts about (weights checksum, task, probe settings), one JSON file each under
    ``WS/eval/tasks``, and where missing ones are scored (``recipe``'s probe settings on ``place``).
    A workspace that cannot be written (read-only) still scores: it only cannot keep them."""
    def __init__(self, ws: Workspace, recipe: Recipe, place: Placement, *, enabled: bool = True):
        self.ws, self.folder = ws, ws.eval_dir / "tasks"
        self.recipe, self.place = recipe, place
        self.settings = probe_settings(recipe, place.precision)
        self.enabled = enabled
        self.hits = self.misses = 0

    def key(self, weights_sha: str, data: T.TaskData) -> str:
        blob = {"format": CACHE_FORMAT, "weights": weights_sha, "task": {**data.identity(), "path": None, "name": None},
                **self.settings}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    def get(self, weights_sha: str, data: T.TaskData) -> dict[str, Any] | None:
        key = self.key(weights_sha, data)
        if self.enabled:
            try:
                doc = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
                if doc.get("key") == key and isinstance(doc.get("scores"), dict):
                    self.hits += 1
                    return doc["scores"]
            except (OSError, ValueError):
                pass
        self.misses += 1
        return None

    def put(self, weights_sha: str, version: str, data: T.TaskData, scores: dict[str, Any]) -> None:
        if not self.enabled:
            return
        key = self.key(weights_sha, data)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / f"{key}.json", json.dumps(
                {"key": key, "version": version, "task": data.identity(), "settings": self.settings,
                 "scores": scores}) + "\n")
        except (OSError, IncrError):  # read-only or full: the score is still returned, only not kept
            self.enabled = False


def version_sha(ws: Workspace, version: str) -> str:
    from incr_cli.scoring.cache import weights_checksum

    return weights_checksum(ws.version_manifest(version))


def score_version(book: TaskBook, version: str, tasks: Sequence[T.TaskData], *, reporter: Reporter,
                  loaded: tuple[Any, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{task: scores} of one version: from the book where recorded, the rest scored (with ``loaded``'s
    (model, tokenizer) when given, else the version loaded once) and recorded. A pruned version keeps
    only recorded scores."""
    from incr_cli.model import weights as models

    ws = book.ws
    sha = version_sha(ws, version)
    out = {d.name: hit for d in tasks if (hit := book.get(sha, d)) is not None}
    todo = [d for d in tasks if d.name not in out]
    if not todo or (loaded is None and ws.pruned(version) is not None):
        return out
    model, tokenizer = loaded or models.load_version(ws, version, recipe=book.recipe, device=str(book.place.device))
    for data in todo:
        reporter.log(probing(version, data))
        out[data.name] = score_task(model, tokenizer, data, book.recipe, place=book.place, reporter=reporter)
        book.put(sha, version, data, out[data.name])
    return out


def score_versions(book: TaskBook, versions: Sequence[str], tasks: Sequence[T.TaskData], *,
                   reporter: Reporter | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """{version: {task: scores}} of each version (``score_version``); ``book`` counts the hits."""
    return {v: score_version(book, v, tasks, reporter=reporter or Quiet()) for v in versions}


def add_task_scores(ws: Workspace, result: Any, recipe: Recipe, tasks: Sequence[T.TaskData], *,
                    reporter: Reporter | None = None, use_cache: bool = True) -> None:
    """Score ``result``'s versions (an ``evaluate.EvalResult``) on ``tasks`` into its task fields."""
    if not tasks:
        return
    import torch

    from incr_cli.runtime.device import Placement

    versions = [i.version for i in result.versions]
    precision = result.settings["precision"]
    book = TaskBook(ws, recipe, Placement(torch.device(result.settings["device"]), precision), enabled=use_cache)
    scores = score_versions(book, versions, tasks, reporter=reporter)
    result.tasks = {v: {name: shown(s) for name, s in per.items()} for v, per in scores.items()}
    result.task_summary = lineage_task_summary(result.lineage, scores, tasks)
    result.task_settings = probe_settings(recipe, precision)
    result.cache_hits += book.hits
    result.cache_misses += book.misses


def probe_file(path: Path, kind: str, fields: dict[str, str | None], recipe: Recipe) -> T.TaskData:
    """An ad-hoc task file (``incr probe``) read as a recipe task would be."""
    name = Path(path).name.split(".")[0] or "task"
    given = {k: v for k, v in fields.items() if v is not None}
    if kind not in T.MAIN:
        raise InputError(f"--kind {kind!r}: use one of {', '.join(T.MAIN)}")
    spec = TaskConfig(name=name[:64], path=str(Path(path).expanduser().absolute()), kind=kind, **given)
    return T.read_task(spec, recipe.probe)


def recorded_task_scores(ws: Workspace, versions: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{version: {task: scores}} as training recorded them in metrics.json: a version's own ("after")
    and its parent's ("before"), so a base version's scores show too. No model is loaded."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for version in versions:
        try:
            metrics = json.loads((ws.version_dir(version) / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        tasks = ((metrics.get("tasks") or {}).get("tasks") or {}) if isinstance(metrics, dict) else {}
        for name, rec in tasks.items():
            if rec.get("after"):
                out.setdefault(version, {})[name] = rec["after"]
            if rec.get("before") and metrics.get("parent"):
                out.setdefault(metrics["parent"], {}).setdefault(name, rec["before"])
    return out


def lineage_task_summary(lineage: Sequence[str], scores: dict[str, dict[str, dict[str, Any]]],
                         tasks: Sequence[T.TaskData]) -> dict[str, dict[str, Any]]:
    """Per task over a lineage (oldest first): its main score at the first and the final version, the
    best one on the way, ``change`` = final - first, ``drop_from_best`` = best - final (the task's
    forgetting: > 0 = the line lost what an earlier version had)."""
    out = {}
    for data in tasks:
        metric = T.MAIN[data.spec.kind]
        seq = [(v, scores.get(v, {}).get(data.name, {}).get(metric)) for v in lineage]
        seq = [(v, x) for v, x in seq if x is not None]
        if not seq:
            continue
        best_v, best = max(seq, key=lambda vx: vx[1])
        out[data.name] = {"metric": metric, "first": seq[0][1], "first_version": seq[0][0], "final": seq[-1][1],
                          "final_version": seq[-1][0], "best": best, "best_version": best_v,
                          "change": seq[-1][1] - seq[0][1], "drop_from_best": best - seq[-1][1]}
    return out


# ----------------------------------------------------------------------------- the task gate


def task_gate_checks(recipe: Recipe, tasks: Sequence[T.TaskData], before: dict[str, dict[str, Any]],
                     after: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One check per gated task: passed unless the main score dropped by more than the margin AND the
    paired 95% bootstrap interval of the change lies wholly below zero (the drop is not noise)."""
    checks = []
    for data in tasks:
        spec = data.spec
        if not (recipe.gate.tasks and spec.gate) or data.name not in before or data.name not in after:
            continue
        b, a = before[data.name], after[data.name]
        metric = T.MAIN[spec.kind]
        margin = recipe.gate.task_max_drop if spec.max_drop is None else spec.max_drop
        change = a[metric] - b[metric]
        interval = T.paired_interval(np.asarray(b["per_example"]), np.asarray(a["per_example"]),
                                     resamples=recipe.probe.bootstrap, seed=recipe.probe.seed)
        passed = not (-change > margin and interval[1] < 0)
        checks.append({"check": "task_max_drop", "increment": data.name, "task": data.name, "metric": metric,
                       "before": b[metric], "after": a[metric], "value": change, "limit": margin,
                       "interval": interval, "passed": passed,
                       "message": f"task {data.name}: {metric} {b[metric]:.4f} -> {a[metric]:.4f} "
                                  f"({change:+.4f}, 95% interval of the change {interval[0]:+.4f}..{interval[1]:+.4f}; "
                                  f"margin {margin:g})"})
    return checks


def task_record(tasks: Sequence[T.TaskData], before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]],
                settings: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's ``tasks``: per task its identity, the parent's and the new version's scores."""
    out = {}
    for data in tasks:
        b, a = before.get(data.name), after.get(data.name)
        metric = T.MAIN[data.spec.kind]
        out[data.name] = {"task": data.identity(), "metric": metric,
                          "before": shown(b) if b else None, "after": shown(a) if a else None,
                          "change": (a[metric] - b[metric]) if a and b else None}
    return {"settings": settings, "tasks": out} if out else {}


__all__ = ["load_tasks", "score_task", "probing", "score_version", "score_versions", "TaskBook", "task_gate_checks", "task_record", "probe_file",
           "probe_settings", "main_score", "shown"]
