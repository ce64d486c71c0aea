"""The score cache: a scored cell (weights x increment x settings) is kept under a key of the weights'
checksum, the held-out data's checksum and the scoring settings, and reused by eval, the gate and
training's before/after scores."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from incr_cli.config.recipe import Recipe
from incr_cli.errors import IntegrityError
from incr_cli.scoring.score import CELL_KEYS, SCORE_KEYS
from incr_cli.store.diskspace import disk_writes
from incr_cli.store.files import NOT_WRITABLE, atomic_write_text
from incr_cli.store.workspace import Workspace

CACHE_FORMAT = 1  # bump when scoring changes, so older cached cells are never reused
# Files of a version folder that do not change its scores (logs, metrics, EWC statistics).
_NOT_WEIGHTS = ("fisher.safetensors",)


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
        self.read_only = False  # set when a write found the folder read-only
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
        if not self.enabled or self.read_only:
            return
        try:
            with disk_writes("eval cache", self.folder):
                self.folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.folder / f"{key}.json", json.dumps({"key": key, **about, "scores": scores}) + "\n")
        except OSError as exc:
            if exc.errno not in NOT_WRITABLE:
                raise
            self.read_only = True  # a read-only workspace: eval scores and prints, and keeps nothing


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
            self._data[increment] = heldout_sha(self.ws, increment)
        return cache_key(weights_sha, increment, self._data[increment], self.settings)

    def get(self, weights_sha: str, increment: str) -> dict[str, Any] | None:
        return self.cache.get(self.key(weights_sha, increment))

    def put(self, weights_sha: str, version: str, increment: str, scores: dict[str, Any]) -> None:
        if all(k in scores for k in SCORE_KEYS):
            self.cache.put(self.key(weights_sha, increment), {k: scores[k] for k in CELL_KEYS if k in scores},
                           {"version": version, "column": increment, "settings": self.settings})


def heldout_sha(ws: Workspace, increment_id: str) -> str:
    record = (ws.increment_manifest(increment_id).get("files") or {}).get("heldout.bin") or {}
    if not record.get("sha256"):
        raise IntegrityError(f"{ws.increment_dir(increment_id) / 'manifest.json'}: lists no heldout.bin; "
                             "remove the folder and ingest again")
    return str(record["sha256"])
