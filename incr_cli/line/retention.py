"""Retention: ``incr gc`` removes what a model line no longer needs, and never what it does.

Kept whole: LATEST; the ``keep_last`` newest versions; the last ``keep_last`` versions of the
rollback chain (where ``incr rollback`` goes); the parent of a resumable state the next run would
resume (one from LATEST); the root of the lineage when the strategy is joint (it trains from it).
Kept always: every version's manifest.json, metrics.json and train_log.jsonl, so a pruned version
stays in ``status``, ``eval`` and lineage queries with its scores; every data increment (replay
needs them). Removed: the weights and tokenizer files of the other versions, resumable states of
runs from another parent and unreadable ones, ``staging/tmp-*`` leftovers, and the eval-cache
entries of removed weights (their scores move into the version's ``pruned.json`` first).

``pruned.json`` is written (atomically) before any file goes, and lists the files it removes: a gc
killed halfway leaves a version that reads as pruned, and the next gc removes the rest.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from incr_cli.config.recipe import Recipe
from incr_cli.errors import UsageError
from incr_cli.faults import fault_point
from incr_cli.methods import STRATEGIES
from incr_cli.methods.base import root_version
from incr_cli.store.files import folder_bytes, fsync_dir, now_iso, safe_relpath, write_json
from incr_cli.store.workspace import PRUNED_FILE, Workspace, rollback_chain

KEEP_FILES = ("manifest.json", "metrics.json", "train_log.jsonl")


@dataclass
class GcReport:
    keep_last: int
    dry_run: bool
    kept: dict[str, list[str]] = field(default_factory=dict)  # version -> why it keeps its weights
    pruned: list[str] = field(default_factory=list)  # versions whose weights go (went) now
    already_pruned: list[str] = field(default_factory=list)
    resume_states: list[str] = field(default_factory=list)
    staging_leftovers: list[str] = field(default_factory=list)
    cache_entries: int = 0
    bytes_freed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve_keep_last(ws: Workspace, recipe: Recipe, keep_last: int | None) -> int:
    """--keep-last, else the recipe's retention.keep_last; at least 1 (LATEST is always kept)."""
    if keep_last is None:
        keep_last = recipe.retention.keep_last
    if keep_last is None:
        raise UsageError(f"{ws.root}: no retention policy; pass --keep-last N or set retention.keep_last in "
                         f"{ws.recipe_path}")
    if keep_last < 1:
        raise UsageError(f"--keep-last {keep_last}: must be at least 1 (LATEST always keeps its weights)")
    return keep_last


def keep_reasons(ws: Workspace, recipe: Recipe, keep_last: int) -> dict[str, list[str]]:
    """Every version that keeps its weights, with why."""
    latest, versions = ws.latest(), ws.versions()
    reasons: dict[str, list[str]] = defaultdict(list)
    reasons[latest].append("LATEST")
    for v in versions[-keep_last:]:
        reasons[v].append(f"one of the {keep_last} newest")
    chain = [v for v in dict.fromkeys(reversed(rollback_chain(ws.history()))) if v in versions]
    for v in chain[:keep_last]:
        reasons[v].append("rollback target" if v != latest else "rollback chain")
    for state in _live_states(ws):
        reasons[state["parent"]].append("parent of a resumable state")
    if name := _root_trainer(ws, recipe, latest):
        reasons[root_version(ws, latest)].append(f"{name} trains from it")
    return {v: reasons[v] for v in versions if v in reasons}


def _root_trainer(ws: Workspace, recipe: Recipe, latest: str) -> str | None:
    """The strategy (the recipe's, or the one LATEST was trained with) that trains from the root, if any."""
    recorded = (ws.version_manifest(latest).get("recipe") or {}).get("strategy", {}).get("name")
    for name in (recipe.strategy.name, recorded):
        if name in STRATEGIES and STRATEGIES[name].trains_from_root:
            return name
    return None


def _live_states(ws: Workspace) -> list[dict[str, Any]]:
    """Resumable states a rerun of cron's command would resume: readable, from LATEST."""
    latest = ws.latest()
    return [s for s in ws.resume_states() if s["step"] is not None and s["parent"] == latest]


def collect_garbage(ws: Workspace, recipe: Recipe, keep_last: int | None = None, *, dry_run: bool = False) -> GcReport:
    """Apply the retention policy (the caller does not hold the lock: gc takes it) -> what went."""
    with ws.lock("gc"):
        if not dry_run:
            ws.finish_interrupted_move()
        report = GcReport(resolve_keep_last(ws, recipe, keep_last), dry_run)
        report.kept = keep_reasons(ws, recipe, report.keep_last)
        cells = _cache_cells(ws)
        for version in ws.versions():
            if version in report.kept:
                continue
            (report.already_pruned if ws.pruned(version) else report.pruned).append(version)
            report.bytes_freed += _prune(ws, version, cells.get(version, []), dry_run)
            report.cache_entries += len(cells.get(version, []))
            for path, _, _ in cells.get(version, []):
                report.bytes_freed += path.stat().st_size
                if not dry_run:
                    path.unlink()
        live = {s["key"] for s in _live_states(ws)}
        stale = [Path(s["path"]) for s in ws.resume_states() if s["key"] not in live]
        leftovers = sorted(ws.staging.glob("tmp-*")) if ws.staging.is_dir() else []
        for folder in [*stale, *leftovers]:
            report.bytes_freed += folder_bytes(folder)
            if not dry_run:
                shutil.rmtree(folder, ignore_errors=True)
        report.resume_states = [str(p) for p in stale]
        report.staging_leftovers = [p.name for p in leftovers]
        return report


def _cache_cells(ws: Workspace) -> dict[str, list[tuple[Path, str, dict[str, Any]]]]:
    """Eval-cache files by the version they score -> [(path, key, scores)]; unreadable files are skipped."""
    cells: dict[str, list[tuple[Path, str, dict[str, Any]]]] = defaultdict(list)
    folder = ws.eval_dir / "cache"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            cells[str(data["version"])].append((path, str(data["key"]), dict(data["scores"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return cells


def _prune(ws: Workspace, version: str, cells: list[tuple[Path, str, dict[str, Any]]], dry_run: bool) -> int:
    """Remove a version's weights and tokenizer, recording them (and its cached scores) first -> bytes."""
    folder = ws.version_dir(version)
    record = ws.pruned(version)
    if record is None:
        files = ws.version_manifest(version).get("files") or {}
        record = {"time": now_iso(), "command": "gc", "removed": [rel for rel in files if rel not in KEEP_FILES],
                  "bytes": 0, "scores": {key: scores for _, key, scores in cells}}
        record["bytes"] = sum(p.stat().st_size for p in _present(folder, record["removed"]))
        if dry_run:
            return record["bytes"]
        write_json(folder / PRUNED_FILE, record)
        fault_point("gc.prune")
    present = _present(folder, record.get("removed") or [])
    freed = sum(p.stat().st_size for p in present)
    if not dry_run:
        for path in present:
            path.unlink()
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(sub.iterdir()):
                sub.rmdir()
        fsync_dir(folder)
    return freed


def _present(folder: Path, rels: list[str]) -> list[Path]:
    return [p for p in (safe_relpath(folder, rel) for rel in rels) if p.is_file()]
