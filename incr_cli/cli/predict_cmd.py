"""`incr fill-mask`: the top predictions of several versions for the same masked texts, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from incr_cli.cli.output import JsonOpt, Output, guarded
from incr_cli.store.workspace import Workspace


def register(app: typer.Typer) -> None:
    app.command("fill-mask")(fill_mask_cmd)


@guarded
def fill_mask_cmd(
    workspace: Annotated[Path, typer.Argument(help="The workspace folder.")],
    texts: Annotated[list[str], typer.Argument(help="Texts with one [MASK] each.")],
    versions: Annotated[str, typer.Option("--versions", help="Comma-separated versions, or 'latest'.")] = "latest",
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=50, help="Predictions shown per text.")] = 5,
    json_out: JsonOpt = False,
) -> None:
    """Show the top-k words each version predicts for [MASK] in each text."""
    from incr_cli.model.predict import (
        fill_mask,  # torch loads only for commands that need it: --help stays fast
    )

    ws = Workspace.open(workspace)
    names = [ws.resolve_version(v) for v in versions.split(",")]
    results = fill_mask(ws, names, texts, top_k=top_k)
    out = Output(json_out)
    if json_out:
        out.emit_json({v: [[{"token": p.token, "score": round(p.score, 4)} for p in row] for row in rows]
                       for v, rows in results.items()})
        return
    rows = []
    for i, text in enumerate(texts):
        rows.append([text, *[", ".join(p.token for p in results[v][i]) for v in names]])
    out.table("fill-mask: top predictions", ["text", *names], rows)
