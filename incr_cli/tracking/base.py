"""What a tracking sink is (``Sink``) and the scalars it is given: the training log's lines and a
version's metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from incr_cli.errors import IntegrityError
from incr_cli.store.workspace import Workspace

_NOT_SCALARS = ("step", "tokens")


@dataclass(frozen=True)
class RunInfo:
    version: str  # the version this run writes: the next one, fixed while the workspace lock is held
    parent: str
    key: str  # the run key: same key, same training
    new: list[str]
    recipe: dict[str, dict[str, Any]]


class Sink(Protocol):
    name: str

    def start(self, run: RunInfo, history: list[dict[str, Any]]) -> None: ...

    def step(self, line: dict[str, Any]) -> None: ...

    def finish(self, metrics: dict[str, Any], version_dir: Path) -> None: ...

    def close(self, status: str) -> None: ...


def train_scalars(line: dict[str, Any]) -> dict[str, float]:
    """One train_log.jsonl line -> {"train/<name>": value} (nulls left out)."""
    return {f"train/{k}": float(v) for k, v in line.items()
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def version_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """metrics.json -> held-out scores before/after per increment, forgetting, and the gate (1 = passed)."""
    out: dict[str, float] = {}
    for when in ("before", "after"):
        for inc, scores in metrics["eval"][when].items():
            out.update({f"eval/{when}/{inc}/{k}": float(v) for k, v in scores.items() if v is not None})
    out.update({f"forgetting/{inc}": float(v) for inc, v in metrics["forgetting"].items() if v is not None})
    for name, rec in ((metrics.get("tasks") or {}).get("tasks") or {}).items():
        for when in ("before", "after"):
            scores = rec.get(when) or {}
            out.update({f"task/{when}/{name}/{k.replace('@', '_at_')}": float(v) for k, v in scores.items()
                        if k in _TASK_SCALARS and isinstance(v, (int, float))})
    out["gate/passed"] = 1.0 if metrics["gate"]["passed"] else 0.0
    return out


_TASK_SCALARS = ("accuracy", "macro_f1", "recall@1", "recall@10", "mrr")


def written_by(ws: Workspace, version: str, key: str | None) -> dict[str, Any] | None:
    """The metrics of ``version`` when the run with key ``key`` wrote it; None when it never got
    written (or another run wrote it)."""
    written = written_metrics(ws, version)
    return written[1] if written is not None and written[0].get("run_key") == key else None


def written_metrics(ws: Workspace, version: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(manifest, metrics) of a written version; None when ``version`` never got written."""
    if version not in ws.versions():
        return None
    try:
        manifest = ws.version_manifest(version)
        metrics = json.loads((ws.version_dir(version) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, IntegrityError):
        return None
    return (manifest, metrics) if isinstance(metrics, dict) else None
