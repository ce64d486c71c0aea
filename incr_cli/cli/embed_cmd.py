"""`incr embed`: texts -> embeddings (.npy) with a version used as a feature extractor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from incr_cli.cli.output import JsonOpt, Output, guarded
from incr_cli.config.recipe import load_recipe
from incr_cli.store.workspace import Workspace


def embed_cmd(
    workspace: Annotated[Path, typer.Argument(help="Workspace directory.", show_default=False)],
    inputs: Annotated[list[str], typer.Argument(
        help="Files, directories (read recursively, sorted) and globs, read like ingest (.gz too).",
        show_default=False)],
    out_file: Annotated[Path, typer.Option("--out", help="The .npy file to write (float32, one row per document).",
                                           show_default=False)],
    version: Annotated[str, typer.Option("--version", help="The version to embed with (vNNNN or latest).")] = "latest",
    pooling: Annotated[str | None, typer.Option(
        "--pooling", help="mean (over the tokens) or cls (the first token). Default: the pooling the version's "
                          "sentence-transformers packaging declares, else mean.", show_default=False)] = None,
    fmt: Annotated[str, typer.Option(
        "--format", help="auto (by name: jsonl, csv, tsv, else lines), lines, paragraphs, jsonl, csv or tsv, "
                         "as ingest reads them.")] = "auto",
    text_field: Annotated[str, typer.Option(
        "--text-field", help="JSON Lines: the field holding the text; CSV/TSV: the column.")] = "text",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Texts per forward pass.")] = 64,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (default: runtime.device).",
                                               show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Embed every document of INPUT... with a version: L2-normalised pooled last hidden states.

    Row i of the .npy is the i-th document: INPUTs in the order given, a folder's files in sorted
    order, documents in file order (one per line, paragraph or JSON line, as ingest reads them; blank
    and rejected ones get no row; no dedup). Texts longer than model.max_seq_len tokens are cut (and
    counted). --json prints each INPUT's first row and row count. Reads the workspace, takes no lock.
    """
    from incr_cli.scoring.embed import EmbedRequest, embed_files

    out = Output(json_out)
    ws = Workspace.open(workspace)
    recipe = load_recipe(ws.recipe_path, [f"runtime.device={device}"] if device else [])
    request = EmbedRequest(inputs, out_file, fmt=fmt, text_field=text_field, pooling=pooling, batch_size=batch_size)
    result = embed_files(ws, ws.resolve_version(version), request, recipe=recipe, reporter=out)
    if json_out:
        out.emit_json(result.to_dict())
        return
    cut = f"; {result.truncated:,} cut to model.max_seq_len" if result.truncated else ""
    out.log(f"{result.rows:,} embeddings of size {result.dim} ({result.pooling} pooling, {result.version}) "
            f"in {result.seconds:.1f} s -> {result.out}{cut}")


def register(app: typer.Typer) -> None:
    """Add `incr embed`."""
    app.command("embed")(guarded(embed_cmd))
