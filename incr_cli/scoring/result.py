"""What an eval returns: the versions and columns of the matrix, their scores and summaries
(``EvalResult``), light to import (no torch), for the renderers and the CLI."""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incr_cli import FORMAT_VERSION, __version__
from incr_cli.scoring.continual import ContinualSummary
from incr_cli.store.files import finite_json

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
    saved: Path | None = None  # the copy under WS/eval/ (None: not saved, e.g. a read-only workspace)

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
