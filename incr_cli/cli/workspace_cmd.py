"""`incr init | status | verify`: create a workspace, show its versions and data, check its files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from incr_cli.cli.output import JsonOpt, Output, OverridesArg, guarded
from incr_cli.recipe import load_recipe

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
    from incr_cli.models import init_workspace

    out = Output(json_out)
    resolved = load_recipe(recipe, overrides or [])
    result = init_workspace(workspace, base, resolved, force=force, allow_pickle=allow_pickle, reporter=out)
    if json_out:
        out.emit_json({"workspace": str(result.root), "version": result.version, "latest": result.version,
                       "head_initialised": result.head_initialised, "source": result.source_info,
                       "replaced": result.replaced})
        return
    out.log(f"initialised {result.root}: {result.version} from {base} (LATEST = {result.version})")
    if result.head_initialised and result.source_info.get("kind") != "scratch":
        out.log("the base had no MLM head: the head was initialised randomly, so fill-mask output is noise "
                "until a first increment trains it")
    out.log(f"next: incr ingest {result.root} PATH...")


def register(app: typer.Typer) -> None:
    """Add init, status and verify to the app."""
    app.command("init")(guarded(init))
