"""`incr promote | rollback | history | gc | export`: run a model line over time: who moved LATEST,
when and why, what is kept on disk, and a version handed on as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from incr_cli.cli.output import JsonOpt, Output, guarded
from incr_cli.cli.workspace_cmd import MOVE_COLUMNS, WorkspaceArg, human_bytes, move_rows
from incr_cli.line import lifecycle
from incr_cli.store.workspace import Workspace

ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why (kept in the audit trail, history.jsonl).",
                                               show_default=False)]


def promote(
    workspace: WorkspaceArg,
    version: Annotated[str, typer.Argument(help="The version to make LATEST (vNNNN or N).", show_default=False)],
    reason: ReasonOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Make VERSION LATEST (a rejected one after review, or an earlier one); its files are verified first."""
    from incr_cli import api

    out = Output(json_out)
    _report_move(out, api.promote(workspace, version, reason=reason, reporter=out), "promote")


def rollback(workspace: WorkspaceArg, reason: ReasonOpt = None, json_out: JsonOpt = False) -> None:
    """LATEST goes back to the version it named before the current one (repeat to go further back)."""
    from incr_cli import api

    out = Output(json_out)
    _report_move(out, api.rollback(workspace, reason=reason, reporter=out), "rollback")


def _report_move(out: Output, move: Any, command: str) -> None:
    if out.json_mode:
        out.emit_json(move.to_json())
        return
    if move.completed is not None:
        out.log(f"completed an interrupted {move.completed.get('command')}: LATEST "
                f"{move.completed.get('from')} -> {move.completed.get('to')}")
    if move.record is not None:
        out.log(f"LATEST {move.previous} -> {move.latest} ({command}); current -> checkpoints/{move.latest}")
    elif move.completed is None or move.completed.get("command") != "rollback":
        out.log(f"LATEST is already {move.latest}; nothing moved")
    pending = ", ".join(move.pending) if move.pending else "none"
    out.log(f"pending increments (trained by the next train-increment): {pending}")


def history(workspace: WorkspaceArg, json_out: JsonOpt = False) -> None:
    """Every move of LATEST: time, from, to, command, user@host, reason, exit state."""
    out = Output(json_out)
    report = lifecycle.history(Workspace.open(workspace))
    if json_out:
        out.emit_json(report)
        return
    out.table("moves of LATEST (history.jsonl)", MOVE_COLUMNS,
              move_rows(report["moves"]))
    out.log(f"LATEST: {report['latest']}; current -> {report['current'] or 'missing'}")
    if report["damaged_lines"]:
        out.warn(f"{report['damaged_lines']} line(s) of history.jsonl could not be read (a write torn by a crash); "
                 "they are skipped")


def gc(
    workspace: WorkspaceArg,
    keep_last: Annotated[int | None, typer.Option("--keep-last", help="Keep the weights of this many newest "
                                                  "versions and rollback targets (default: retention.keep_last).",
                                                  show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go; remove nothing.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove the weights of versions the retention policy does not keep, stale resumable states and leftovers.

    Manifests, metrics and scores of every version stay (a pruned version is still listed), and data
    increments are never removed.
    """
    from incr_cli.config.recipe import load_recipe
    from incr_cli.line.retention import collect_garbage

    out = Output(json_out)
    ws = Workspace.open(workspace)
    report = collect_garbage(ws, load_recipe(ws.recipe_path), keep_last, dry_run=dry_run)
    if json_out:
        out.emit_json(report.to_json())
        return
    out.table("versions that keep their weights", ["version", "why"],
              [[v, ", ".join(why)] for v, why in report.kept.items()])
    verb = "would free" if dry_run else "freed"
    pruned = ", ".join(report.pruned) or "none"
    out.log(f"{'would prune' if dry_run else 'pruned'}: {pruned}; {len(report.resume_states)} stale resumable "
            f"state(s), {len(report.staging_leftovers)} staging leftover(s), {report.cache_entries} eval-cache "
            f"entr{'y' if report.cache_entries == 1 else 'ies'}; {verb} {human_bytes(report.bytes_freed)} "
            f"({report.bytes_freed} bytes)")


def export(
    workspace: WorkspaceArg,
    out_dir: Annotated[Path, typer.Argument(help="New folder to write (never overwritten).", show_default=False)],
    version: Annotated[str | None, typer.Option("--version", help="The version to export (default: LATEST).",
                                                show_default=False)] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Weights as fp32, fp16 or bf16.")] = "fp32",
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="int8: ONNX graphs with int8 weights for ONNX Runtime on CPU (extra `onnx`).",
        show_default=False)] = None,
    file_format: Annotated[str, typer.Option(
        "--format", help="safetensors (Hugging Face) or onnx (fp32 graphs for ONNX Runtime, extra `onnx`); "
        "--quantize int8 implies onnx.")] = "safetensors",
    json_out: JsonOpt = False,
) -> None:
    """Write a version as a self-contained folder (weights, config, tokenizer, model card): Hugging Face
    safetensors, or ONNX graphs for fill-mask and embeddings (--format onnx in fp32, --quantize int8)."""
    from incr_cli import api

    out = Output(json_out)
    result = api.export(workspace, out_dir, version=version, dtype=dtype, quantize=quantize, file_format=file_format)
    if json_out:
        out.emit_json(result.to_json())
        return
    out.log(f"exported {result.version} ({result.dtype}, {human_bytes(result.bytes)}) to {result.out}: "
            f"{', '.join(result.files)}")
    where = str(result.out)
    if result.format == "onnx":
        out.log(f"load it with onnxruntime.InferenceSession({where + '/model.onnx'!r}) (fill-mask logits) or "
                f"{where + '/encoder.onnx'!r} (embeddings); README.md in it shows how")
    else:
        out.log(f"load it with AutoModelForMaskedLM.from_pretrained({where!r}) or "
                f"pipeline('fill-mask', model={where!r})")


def push(
    workspace: WorkspaceArg,
    repo_id: Annotated[str, typer.Argument(help="The Hub repository: NAME or OWNER/NAME.", show_default=False)],
    version: Annotated[str | None, typer.Option("--version", help="The version to publish (default: LATEST).",
                                                show_default=False)] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    license_id: Annotated[str | None, typer.Option(
        "--license", help="The license to declare (e.g. apache-2.0); needed when the base's card names none.",
        show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be sent; send nothing.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Publish a version to the Hugging Face Hub: its export (weights, tokenizer, sentence-transformers
    packaging) with a model card naming REPO_ID, in one commit. The token comes from HF_TOKEN or
    `hf auth login`, the endpoint from HF_ENDPOINT. Exit 2 without a token, offline, with an
    unknown license and no --license, or when the Hub refuses or cannot be reached."""
    from incr_cli.line.push import push_version

    out = Output(json_out)
    result = push_version(Workspace.open(workspace), version, repo_id, private=private, license_id=license_id,
                          dry_run=dry_run)
    if json_out:
        out.emit_json(result.to_json())
        return
    out.table(f"{result.version} -> {repo_id}" + (" (dry run)" if dry_run else ""), ["file", "bytes"],
              [[name, human_bytes(size)] for name, size in result.files.items()])
    if dry_run:
        out.log(f"dry run: {len(result.files)} files ({human_bytes(sum(result.files.values()))}) would be sent to "
                f"{repo_id}, license {result.license}; nothing was sent")
    else:
        out.log(f"pushed {result.version} to {result.url} ({result.commit})")


def register(app: typer.Typer) -> None:
    """Add promote, rollback, history, gc, export and push to the app."""
    app.command("promote")(guarded(promote))
    app.command("rollback")(guarded(rollback))
    app.command("history")(guarded(history))
    app.command("gc")(guarded(gc))
    app.command("export")(guarded(export))
    app.command("push")(guarded(push))
