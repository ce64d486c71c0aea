"""Downstream tasks: reading a labelled task file, and the pure scores of embeddings on it.

A task (``eval.tasks`` in the recipe, or ``incr probe``'s file) is a file of labelled rows:
- ``classification``: text + label (+ an optional group, e.g. the source document). Score: a linear
  probe (scikit-learn's multinomial logistic regression on standardised, frozen embeddings) trained
  and scored out of fold with seeded, stratified k-fold cross-validation, group-aware when a group
  field is named (a group's rows are never on both sides of a split). Reported: accuracy and macro-F1
  of the out-of-fold predictions, each with a 95% interval from a seeded bootstrap over the examples.
- ``retrieval``: query + relevant text. Every distinct relevant text is a candidate; each query's
  candidates are ranked by cosine. Reported: recall@1, recall@10 and MRR, MRR with a bootstrap interval.

The main score (``MAIN``) is what the task gate compares: accuracy, or MRR. Each score keeps its
per-example values (correct 0/1, or the reciprocal rank) so the gate can compare two versions on the
same examples (``paired_interval``). Everything here is seeded and deterministic: the folds depend on
the labels, groups and seed only, never on the embeddings, so two versions are probed on the same folds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from incr_cli.config.recipe import ProbeConfig, TaskConfig
from incr_cli.errors import InputError, clip, shown

MAIN = {"classification": "accuracy", "retrieval": "mrr"}
MAX_TASK_BYTES = 512 << 20  # a task file is read whole: far past this it is not a task file
FIRST_FIELDS = 5  # records whose fields a "missing field" message lists
RECALL_AT = (1, 10)


@dataclass
class TaskData:
    """A task file read and checked: ``texts`` (classification: the texts; retrieval: the distinct
    relevant texts, the candidates), ``labels`` / ``groups`` (classification), ``queries`` and
    ``positive`` (retrieval: the index in ``texts`` of each query's relevant text)."""

    spec: TaskConfig
    sha256: str  # of the file's bytes
    rows: int  # rows in the file (before the max_examples sample)
    texts: list[str]
    labels: list[str] = field(default_factory=list)
    groups: list[str] | None = None
    queries: list[str] = field(default_factory=list)
    positive: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    def identity(self) -> dict[str, Any]:
        """What makes two scores of this task comparable (the cache key and metrics.json's record)."""
        s = self.spec
        fields = ([s.query_field, s.text_field] if s.kind == "retrieval"
                  else [s.text_field, s.label_field, s.group_field])
        return {"name": s.name, "kind": s.kind, "path": s.path, "sha256": self.sha256, "fields": fields,
                "rows": self.rows, "examples": len(self.queries) if s.kind == "retrieval" else len(self.texts)}


# ----------------------------------------------------------------------------- reading


def _read_bytes(spec: TaskConfig) -> bytes:
    path = Path(spec.path)
    where = f"task {spec.name!r}: {clip(spec.path)}"
    if not path.exists():
        raise InputError(f"{where}: not found; check eval.tasks[].path (relative to the recipe file) or the probe's file")
    if not path.is_file():
        raise InputError(f"{where}: not a file; name a JSON Lines or CSV file of labelled rows")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TASK_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{where}: cannot read ({clip(exc.strerror or str(exc))}); check its permissions") from None
    if len(raw) > MAX_TASK_BYTES:
        raise InputError(f"{where}: larger than {MAX_TASK_BYTES >> 20} MiB; sample it (probe.max_examples rows are used)")
    return raw


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise InputError(f"{where}: invalid UTF-8 at line {line} (byte {exc.start}); re-encode the file as UTF-8") from None


def _records(text: str, path: str, where: str) -> list[dict[str, Any]]:
    """The file's rows as mappings: CSV/TSV (a header row) by extension, else JSON Lines."""
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            return [dict(row) for row in reader]
        except csv.Error as exc:
            raise InputError(f"{where}: not valid CSV at line {reader.line_num} ({clip(str(exc))})") from None
    if text.lstrip().startswith("["):
        raise InputError(f"{where}: a JSON array; write one JSON object per line (JSON Lines), e.g. "
                         "`jq -c '.[]' file.json > file.jsonl`")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise InputError(f"{where}: line {number} is not JSON; each line must be one object like "
                             '{"text": ..., "label": ...}') from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: line {number} is {shown(row)}, not an object with named fields")
        rows.append(row)
    return rows


def _column(rows: list[dict[str, Any]], key: str, where: str, what: str, *, labels: bool = False) -> list[Any]:
    """The values of field ``key`` in every row, checked: strings (labels: strings or integers)."""
    values = []
    for i, row in enumerate(rows):
        if key not in row or row[key] is None:
            found = sorted({k for r in rows[:FIRST_FIELDS] for k in r})
            raise InputError(f"{where}: row {i + 1} has no {what} field {key!r}; the first rows have "
                             f"{', '.join(map(repr, found)) or 'no fields'} (set eval.tasks[].{what}_field or --{what}-field)")
        value = row[key]
        ok = isinstance(value, str) or (labels and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            kinds = "a string or an integer" if labels else "a string"
            raise InputError(f"{where}: row {i + 1}: {what} {key!r} is {shown(value)}, expected {kinds}")
        values.append(str(value) if labels else value)
    return values


def read_task(spec: TaskConfig, probe: ProbeConfig) -> TaskData:
    """Read and check ``spec``'s file -> TaskData (at most ``probe.max_examples`` rows, a seeded sample).

    Raises InputError (exit 2) with one line naming the task and the file for every problem a
    night of training must not be spent on: missing, empty, a missing field (naming those found),
    texts or labels of the wrong type, one class only, fewer examples (or groups) per class than folds."""
    where = f"task {spec.name!r}: {clip(spec.path)}"
    raw = _read_bytes(spec)
    rows = _records(_decode(raw, where), spec.path, where)
    if not rows:
        raise InputError(f"{where}: no rows; a task needs labelled rows, one per line")
    n = len(rows)
    if n > probe.max_examples:
        keep = np.sort(np.random.default_rng(probe.seed).choice(n, probe.max_examples, replace=False))
        rows = [rows[i] for i in keep]
    data = TaskData(spec, hashlib.sha256(raw).hexdigest(), n, [])
    if spec.kind == "retrieval":
        return _retrieval(data, rows, where)
    return _classification(data, rows, probe, where)


def _classification(data: TaskData, rows: list[dict[str, Any]], probe: ProbeConfig, where: str) -> TaskData:
    spec = data.spec
    data.texts = _column(rows, spec.text_field, where, "text")
    data.labels = _column(rows, spec.label_field, where, "label", labels=True)
    if spec.group_field:
        data.groups = [str(g) for g in _column(rows, spec.group_field, where, "group", labels=True)]
    counts = Counter(data.labels)
    if len(counts) < 2:
        raise InputError(f"{where}: one class only ({shown(next(iter(counts)))}); a classification task needs two or more labels")
    label, fewest = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if fewest < probe.folds:
        raise InputError(f"{where}: label {label!r} has {fewest} example{'s' if fewest != 1 else ''}, fewer than the "
                         f"{probe.folds} folds (probe.folds); add examples or lower probe.folds")
    if data.groups is not None:
        groups_of = {lab: set() for lab in counts}
        for lab, g in zip(data.labels, data.groups):
            groups_of[lab].add(g)
        label, few = min(((lab, len(g)) for lab, g in groups_of.items()), key=lambda kv: (kv[1], kv[0]))
        if len(set(data.groups)) < probe.folds or few < 2:
            raise InputError(f"{where}: {len(set(data.groups))} groups in all, label {label!r} in {few}: too few for "
                             f"{probe.folds} group-aware folds (probe.folds); add documents or drop group_field")
    return data


def _retrieval(data: TaskData, rows: list[dict[str, Any]], where: str) -> TaskData:
    spec = data.spec
    data.queries = _column(rows, spec.query_field, where, "query")
    relevant = _column(rows, spec.text_field, where, "text")
    index: dict[str, int] = {}
    for text in relevant:
        index.setdefault(text, len(index))
    data.texts = list(index)
    data.positive = [index[t] for t in relevant]
    if len(data.texts) < 2:
        raise InputError(f"{where}: one relevant text only; retrieval needs two or more candidates")
    return data


# ----------------------------------------------------------------------------- pure scores


def bootstrap_interval(values: np.ndarray, *, resamples: int, seed: int, level: float = 0.95) -> list[float]:
    """Seeded percentile bootstrap of the mean of ``values`` (N,) -> [low, high]."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def paired_interval(before: np.ndarray, after: np.ndarray, *, resamples: int, seed: int) -> list[float]:
    """95% bootstrap interval of mean(after - before) over the same examples: below zero = a real drop."""
    return bootstrap_interval(np.asarray(after, np.float64) - np.asarray(before, np.float64),
                              resamples=resamples, seed=seed)


def macro_f1(y: np.ndarray, pred: np.ndarray, classes: int) -> float:
    """Macro-averaged F1 of integer labels ``y`` and predictions ``pred`` (a class never predicted nor
    present counts 0, as scikit-learn's ``zero_division=0``)."""
    tp = np.bincount(y[y == pred], minlength=classes).astype(np.float64)
    predicted = np.bincount(pred, minlength=classes)
    actual = np.bincount(y, minlength=classes)
    denom = predicted + actual
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))


def _f1_interval(y: np.ndarray, pred: np.ndarray, classes: int, probe: ProbeConfig) -> list[float]:
    rng = np.random.default_rng(probe.seed)
    draws = rng.integers(0, len(y), (probe.bootstrap, len(y)))
    f1s = np.array([macro_f1(y[d], pred[d], classes) for d in draws])
    return [float(np.percentile(f1s, 2.5)), float(np.percentile(f1s, 97.5))]


def probe_folds(labels: list[str], groups: list[str] | None, probe: ProbeConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) index pairs of the cross-validation: stratified by label, grouped when
    ``groups`` is given, shuffled by ``probe.seed``; they never depend on the embeddings."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(labels)
    x = np.zeros((len(y), 1))
    if groups is None:
        return list(StratifiedKFold(probe.folds, shuffle=True, random_state=probe.seed).split(x, y))
    return list(StratifiedGroupKFold(probe.folds, shuffle=True, random_state=probe.seed).split(x, y, groups))


def classification_scores(emb: np.ndarray, labels: list[str], groups: list[str] | None,
                          probe: ProbeConfig) -> dict[str, Any]:
    """emb (N, H) -> out-of-fold accuracy and macro-F1 of a logistic-regression probe, with intervals."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = sorted(set(labels))
    y = np.array([classes.index(lab) for lab in labels])
    pred = np.full(len(y), -1)
    fold_accuracy = []
    for train, test in probe_folds(labels, groups, probe):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=probe.C, max_iter=probe.max_iter))
        model.fit(emb[train].astype(np.float64), y[train])
        pred[test] = model.predict(emb[test].astype(np.float64))
        fold_accuracy.append(float(np.mean(pred[test] == y[test])))
    correct = (pred == y).astype(np.float64)
    return {"accuracy": float(correct.mean()),
            "accuracy_ci": bootstrap_interval(correct, resamples=probe.bootstrap, seed=probe.seed),
            "macro_f1": macro_f1(y, pred, len(classes)), "macro_f1_ci": _f1_interval(y, pred, len(classes), probe),
            "fold_accuracy": fold_accuracy, "classes": len(classes), "chance": float(np.max(np.bincount(y)) / len(y)),
            "examples": int(len(y)), "per_example": correct.astype(int).tolist()}


def retrieval_scores(queries: np.ndarray, texts: np.ndarray, positive: list[int], probe: ProbeConfig) -> dict[str, Any]:
    """queries (Q, H), texts (N, H) L2-normalised; ``positive[i]`` the index of query i's relevant text
    -> recall@1, recall@10 and MRR of cosine search over all N texts (ties ranked by index)."""
    ranks = np.empty(len(positive), np.int64)
    pos = np.asarray(positive)
    for start in range(0, len(pos), 1024):
        sim = queries[start:start + 1024] @ texts.T  # (q, N)
        rows = np.arange(sim.shape[0])
        target = sim[rows, pos[start:start + 1024]][:, None]
        before = np.arange(texts.shape[0])[None, :] < pos[start:start + 1024][:, None]
        ranks[start:start + 1024] = ((sim > target) | ((sim == target) & before)).sum(axis=1)
    rr = 1.0 / (ranks + 1.0)
    out: dict[str, Any] = {f"recall@{k}": float(np.mean(ranks < k)) for k in RECALL_AT}
    out.update({"mrr": float(rr.mean()), "mrr_ci": bootstrap_interval(rr, resamples=probe.bootstrap, seed=probe.seed),
                "candidates": int(texts.shape[0]), "examples": int(len(pos)), "per_example": rr.tolist()})
    return out


__all__ = ["MAIN", "TaskData", "read_task", "classification_scores", "retrieval_scores", "probe_folds",
           "bootstrap_interval", "paired_interval", "macro_f1"]
