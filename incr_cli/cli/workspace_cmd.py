"""`incr init | status | verify`: create a workspace, show its versions and data, check its files."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from incr_cli.cli.output import JsonOpt, Output, OverridesArg, guarded
from incr_cli.errors import IncrError, IntegrityError, UsageError
from incr_cli.store.files import folder_bytes
from incr_cli.store.lock import WorkspaceLock
from incr_cli.store.workspace import Workspace

MOVE_COLUMNS = ["time", "from", "to", "command", "by", "reason", "state"]
WorkspaceArg = Annotated[Path, typer.Argument(help="Workspace directory.", show_default=False)]


def init(
    workspace: WorkspaceArg,
    base: Annotated[str, typer.Option("--base", help="A model directory (Hugging Face layout), a hub id, "
                                      "scratch:tiny, scratch:mini or minilm-l6.", show_default=False)],
    overrides: OverridesArg = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe file (default: built-in defaults).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing workspace's versions and data.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle weights (.bin/.pt), "
                                               "which can run code when loaded. Only for sources you trust.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create WORKSPACE with the base model as version v0000 and the resolved recipe."""
    from incr_cli import api

    out = Output(json_out)
    result = api.init(workspace, base, recipe=recipe, overrides=overrides or [], force=force,
                      allow_pickle=allow_pickle, reporter=out)
    if json_out:
        out.emit_json({"workspace": str(result.root), "version": result.version, "latest": result.version,
                       "head_initialised": result.head_initialised, "source": result.source_info,
                       "replaced": result.replaced})
        return
    out.log(f"initialised {result.root}: {result.version} from {base} (LATEST = {result.version})")
    if result.head_initialised and result.source_info.get("kind") != "scratch":
        out.log("the base had no MLM head: the head was initialised randomly, so fill-mask output is noise "
                "until a first increment trains it")
    out.log(f"next: incr ingest {shlex.quote(str(result.root))} PATH...")


def status(workspace: WorkspaceArg, json_out: JsonOpt = False) -> None:
    """Show versions (parent, status, data seen, size), LATEST and pending increments."""
    out = Output(json_out)
    report = workspace_status(Workspace.open(workspace))
    if json_out:
        out.emit_json(report)
        return
    latest = report["latest"]
    rows = [[v["version"] + (" *" if v["version"] == latest else ""), v["parent"] or "-", _status_word(v),
             v["trained_on"], ", ".join(v["new"]) or "-", human_bytes(v["size_bytes"]), v["created"] or "?"]
            for v in report["versions"]]
    columns = ["version", "parent", "status", "trained on", "new", "size", "created"]
    if any(v["tasks"] for v in report["versions"]):
        columns.append("tasks")
        for row, v in zip(rows, report["versions"]):
            row.append(", ".join(f"{k} {x:.3f}" for k, x in v["tasks"].items() if x is not None) or "-")
    out.table("versions (* = LATEST)", columns, rows)
    incs = [[d["id"], "pending" if d["pending"] else "trained", d["sequences"].get("train", "?"),
             d["sequences"].get("heldout", "?"), d["tokens"].get("train", "?"), _share(d["unknown"]), d["created"] or "?"]
            for d in report["increments"]]
    if incs:
        out.table("increments", ["increment", "state", "train seqs", "held-out seqs", "train tokens", "unknown",
                                 "created"], incs)
    if report["history"]:
        out.table("last moves of LATEST (all: incr history)", MOVE_COLUMNS,
                  move_rows(report["history"]))
    pending = report["pending"]
    out.log(f"LATEST: {latest}; pending increments: {', '.join(pending) if pending else 'none'}")
    if report["current"] != latest:
        out.warn(stale_link_warning(Path(workspace), report["current"], latest))
    running = WorkspaceLock(Path(workspace), "status").live_holder()
    for state in report["resume_states"]:
        at = "unreadable" if state["step"] is None else f"step {state['step']} of {state['steps']}"
        if running is not None and running.command == "train-increment":  # it is being resumed (or trained) now
            out.log(f"resumable state in {state['path']} ({at}): train-increment PID {running.pid} is running "
                    f"(since {running.started}) and writes it")
            continue
        out.warn(f"an interrupted run from {state['parent'] or '?'} ({', '.join(state['new']) or '?'}, {at}) left "
                 f"{human_bytes(state['bytes'])} of resumable state in {state['path']}: rerun the same "
                 "train-increment to resume it; a version from that parent removes it")
    if report["staging_leftovers"]:
        out.warn(f"{len(report['staging_leftovers'])} temporary folders left by interrupted writers in "
                 f"{workspace}/staging (removed by the next writing command)")


def _share(unknown: dict | None) -> str:
    """An increment's unknown share for the status table: the larger of [UNK] tokens and dropped characters."""
    if not unknown:
        return "?"  # an increment ingested before incr measured it
    return f"{max(unknown.get('unknown_share', 0.0), unknown.get('dropped_share', 0.0)):.1%}"


def verify(
    workspace: WorkspaceArg,
    all_versions: Annotated[bool, typer.Option("--all", help="Check every version, not only LATEST.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Check files against their manifests' sha256 and sizes (LATEST and every increment; --all: every version)."""
    out = Output(json_out)
    report = verify_workspace(Workspace.open(workspace), all_versions=all_versions)
    if json_out:
        out.emit_json(report)
    else:
        for item in report["checked"]:
            out.log(f"{item['id']}: {'ok' if item['ok'] else 'FAILED'}")
    failures = [item["error"] for item in report["checked"] if not item["ok"]]
    if failures:
        head = failures[0] if len(failures) == 1 else f"{len(failures)} folders failed verification: {failures[0]}"
        raise IntegrityError("\n".join([head, *(f"  {f}" for f in failures[1:])]))
    if not json_out:
        out.log(f"{len(report['checked'])} folders verified, all files match their manifests")


# ----------------------------------------------------------------------------- library side (no output)


def workspace_status(ws: Workspace) -> dict:
    """Versions, increments, LATEST and pending increments as one JSON-able dict (no lock needed).

    A version whose manifest cannot be read is listed with status "unreadable" and the reason, so
    status still shows the rest of the workspace.
    """
    latest = ws.latest()
    moves = ws.history()
    by_hand = {m.get("to") for m in moves if m.get("command") == "promote"}
    versions = []
    for version in ws.versions():
        folder = ws.version_dir(version)
        entry = {"version": version, "parent": None, "status": "unreadable", "promoted": False, "trained_on": 0,
                 "new": [], "size_bytes": folder_bytes(folder), "created": None, "head_initialised": None,
                 "pruned": False, "promoted_by_hand": version in by_hand, "problem": None}
        try:
            manifest = ws.version_manifest(version)
            entry.update(parent=manifest.get("parent"), status=str(manifest.get("status", "?")),
                         promoted=bool(manifest.get("promoted", False)),
                         trained_on=len(manifest.get("trained_on") or []), new=list(manifest.get("new") or []),
                         created=manifest.get("created"), head_initialised=manifest.get("head_initialised"),
                         pruned=ws.pruned(version) is not None)
        except IncrError as exc:
            entry["problem"] = str(exc)
        versions.append(entry)
    from incr_cli.scoring.probe import main_score, recorded_task_scores

    tasks = recorded_task_scores(ws, [v["version"] for v in versions])
    for entry in versions:
        entry["tasks"] = {name: main_score(s) for name, s in tasks.get(entry["version"], {}).items()}
    pending = ws.pending(latest)
    increments = []
    for inc in ws.increments():
        entry = {"id": inc, "pending": inc in pending, "sequences": {}, "tokens": {}, "created": None,
                 "size_bytes": folder_bytes(ws.increment_dir(inc)), "unknown": None, "problem": None}
        try:
            manifest = ws.increment_manifest(inc)
            entry.update(sequences=dict(manifest.get("sequences") or {}), tokens=dict(manifest.get("tokens") or {}),
                         created=manifest.get("created"), unknown=manifest.get("unknown"))
        except IncrError as exc:
            entry["problem"] = str(exc)
        increments.append(entry)
    leftovers = sorted(p.name for p in ws.staging.glob("tmp-*")) if ws.staging.is_dir() else []
    return {"workspace": str(ws.root), "latest": latest, "versions": versions, "increments": increments,
            "pending": pending, "staging_leftovers": leftovers, "resume_states": ws.resume_states(),
            "current": ws.current_target(), "history": moves[-5:]}


def verify_workspace(ws: Workspace, *, all_versions: bool = False) -> dict:
    """Hash every file of LATEST (or every version) and every increment against its manifest.

    The stat-keyed hash cache is bypassed: an on-demand check reads every byte.
    """
    checked = []
    try:
        versions = ws.versions() if all_versions else [ws.latest()]
    except IntegrityError as exc:
        checked.append({"kind": "latest", "id": "LATEST", "ok": False, "error": str(exc)})
        versions = ws.versions()
    targets = [("version", v, ws.version_dir(v)) for v in versions]
    targets += [("increment", d, ws.increment_dir(d)) for d in ws.increments()]
    for kind, name, folder in targets:
        try:
            ws.verify_folder(folder, use_cache=False)
            checked.append({"kind": kind, "id": name, "ok": True, "error": None})
        except IncrError as exc:
            checked.append({"kind": kind, "id": name, "ok": False, "error": str(exc)})
    return {"workspace": str(ws.root), "ok": all(c["ok"] for c in checked), "checked": checked}


def _status_word(v: dict) -> str:
    words = [v["status"]] + (["promoted by hand"] if v["promoted_by_hand"] and v["status"] == "rejected" else [])
    return ", ".join(words + (["pruned"] if v["pruned"] else []))


def move_rows(moves: list[dict]) -> list[list[str]]:
    """Table rows of audit records (status and `incr history`)."""
    return [[m.get("time", "?"), m.get("from") or "-", m.get("to", "?"), m.get("command", "?"),
             f"{m.get('user', '?')}@{m.get('host', '?')}", m.get("reason") or "-", m.get("exit_state", "?")]
            for m in moves]


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def current(workspace: WorkspaceArg, json_out: JsonOpt = False) -> None:
    """Print the version WORKSPACE/current points at and its folder: the path to serve from
    (`AutoModelForMaskedLM.from_pretrained(WS/current)`). Exit 2 when the link is missing."""
    ws = Workspace.open(workspace)
    version, latest = ws.current_target(), ws.latest()
    if version is None:
        raise UsageError(f"{ws.current_path}: missing or not a link to a version; `incr promote "
                         f"{shlex.quote(str(ws.root))} {latest}` sets it")
    path = ws.version_dir(version).resolve()
    if json_out:
        Output(json_out).emit_json({"version": version, "path": str(path), "link": str(ws.current_path),
                                    "latest": latest, "is_latest": version == latest})
        return
    sys.stdout.write(f"{version}\t{path}\n")  # one line, tab-separated: for $(incr current WS | cut -f2)
    if version != latest:
        Output(False).warn(stale_link_warning(ws.root, version, latest))


def stale_link_warning(root: Path, current: str | None, latest: str) -> str:
    """What status and current say when WS/current is not LATEST, with the command that mends it."""
    return (f"{root}/current points at {current or 'nothing'}, not LATEST ({latest}): a move was interrupted, or "
            f"the workspace predates the link; `incr promote {shlex.quote(str(root))} {latest}` sets it")


def register(app: typer.Typer) -> None:
    """Add init, status, current and verify to the app."""
    app.command("init")(guarded(init))
    app.command("status")(guarded(status))
    app.command("current")(guarded(current))
    app.command("verify")(guarded(verify))
