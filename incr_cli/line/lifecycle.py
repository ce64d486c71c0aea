"""Moving LATEST by hand: ``promote`` any complete version (a rejected one after review, an earlier
one) and ``rollback`` to the version LATEST named before, as the audit trail records.

Both hold the workspace lock, verify the target's files (every byte) before anything moves, go
through ``Workspace.move_latest`` (LATEST, ``current`` and the audit record together) and are
idempotent: promoting LATEST again records nothing, and the rerun of a command killed while it
moved LATEST completes that move instead of making a second one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from incr_cli import tracking
from incr_cli.config.recipe import TrackingConfig, load_recipe
from incr_cli.errors import IncrError, UsageError
from incr_cli.progress import Quiet, Reporter
from incr_cli.store.files import read_lines
from incr_cli.store.workspace import Workspace, rollback_chain


@dataclass
class Move:
    """What a promote or rollback did."""

    latest: str  # LATEST afterwards
    previous: str | None  # LATEST before (None: unknown)
    record: dict[str, Any] | None  # the audit record appended (None: nothing moved)
    completed: dict[str, Any] | None = None  # an interrupted command's move that this one completed
    pending: list[str] = field(default_factory=list)  # increments the next train-increment trains

    def to_json(self) -> dict[str, Any]:
        return {"latest": self.latest, "previous": self.previous, "moved": self.record is not None,
                "record": self.record, "completed_interrupted": self.completed, "pending": self.pending}


def check_target(ws: Workspace, version: str) -> None:
    """Refuse a target without weights (pruned) or whose files do not match its manifest (exit 2)."""
    ws.require_weights(version)
    ws.verify_folder(ws.version_dir(version), use_cache=False)


def promote(ws: Workspace, spec: str, *, reason: str | None = None, reporter: Reporter | None = None) -> Move:
    """Make ``spec`` (vNNNN or N) LATEST, whatever the gate said about it."""
    with ws.lock("promote"):
        completed = ws.finish_interrupted_move()
        version = ws.resolve_version(spec)
        check_target(ws, version)
        before = ws.latest_name()
        record = ws.move_latest(version, command="promote", reason=reason)
        _follow_in_registry(ws, reporter or Quiet())
        return Move(version, before, record, completed, ws.pending(version))


def _follow_in_registry(ws: Workspace, reporter: Reporter) -> None:
    """MLflow's registry alias follows LATEST (when MLflow is configured for the workspace)."""
    if tracking.mlflow_configured(ws.root):
        tracking.follow_latest(_tracking_config(ws, reporter), ws, reporter)


def _tracking_config(ws: Workspace, reporter: Reporter) -> TrackingConfig:
    """The workspace recipe's tracking section; its registered model, when unset there, is the one
    the newest version was trained with (``tracking.registered_model=NAME`` given on the command line)."""
    try:
        config = load_recipe(ws.recipe_path, []).tracking
    except IncrError as exc:
        reporter.warn(f"tracking: {ws.recipe_path} cannot be read ({exc}); the defaults are used")
        config = TrackingConfig()
    if config.registered_model is None:
        for version in reversed(ws.versions()):
            recorded = ((ws.version_manifest(version).get("recipe") or {}).get("tracking") or {})
            if recorded.get("registered_model"):
                return TrackingConfig(config.sinks, config.mlflow_experiment, recorded["registered_model"],
                                      config.flush_timeout)
    return config


def rollback(ws: Workspace, *, reason: str | None = None, reporter: Reporter | None = None) -> Move:
    """LATEST goes back to the version it named before the current one; repeat to go further back."""
    reporter = reporter or Quiet()
    with ws.lock("rollback"):
        completed = ws.finish_interrupted_move()
        latest = ws.latest()
        if completed is not None and completed.get("command") == "rollback":
            # The rerun of a killed rollback finishes it; it does not roll back a second time.
            _follow_in_registry(ws, reporter)
            return Move(latest, completed.get("from"), None, completed, ws.pending(latest))
        chain = rollback_chain(ws.history())
        if chain and chain[-1] != latest:  # LATEST was edited by hand: back to the last recorded one
            target = chain[-1]
        elif len(chain) >= 2:
            target = chain[-2]
        else:
            raise UsageError(f"{ws.history_path}: records no version before {latest} to roll back to; "
                             f"name one with `incr promote {ws.root} VERSION`")
        if target not in ws.versions():
            raise UsageError(f"cannot roll back to {target}: its folder is gone; name another with "
                             f"`incr promote {ws.root} VERSION`")
        check_target(ws, target)
        record = ws.move_latest(target, command="rollback", reason=reason)
        _follow_in_registry(ws, reporter)
        return Move(target, latest, record, completed, ws.pending(target))


def history(ws: Workspace) -> dict[str, Any]:
    """Every move of LATEST (oldest first), the lines a crash tore, and where LATEST and current point."""
    records, damaged = read_lines(ws.history_path)
    return {"workspace": str(ws.root), "latest": ws.latest(), "current": ws.current_target(),
            "moves": records, "damaged_lines": damaged, "rollback_chain": rollback_chain(records)}
