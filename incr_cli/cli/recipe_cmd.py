"""`incr recipe validate|show`: check recipe files and print a resolved recipe with its defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from incr_cli.cli.output import JsonOpt, Output, OverridesArg, guarded
from incr_cli.config.recipe import load_recipe, preset_settings, recipe_to_dict, recipe_to_yaml
from incr_cli.errors import EXIT_USAGE, RecipeError

app = typer.Typer(help="Check and show recipes (YAML files of training settings).", no_args_is_help=True)


@app.command()
@guarded
def validate(
    files: Annotated[list[Path], typer.Argument(help="Recipe files to check.")],
    json_out: JsonOpt = False,
) -> None:
    """Check recipe files; every problem in every file is reported (exit 2 if any)."""
    out = Output(json_out)
    results = {}
    for path in files:
        try:
            load_recipe(path)
            results[str(path)] = []
            out.log(f"{path}: ok")
        except RecipeError as exc:
            results[str(path)] = exc.problems
            out.error(str(exc))  # a failed check, not a warning: the command exits 2
    if json_out:
        out.emit_json({"ok": not any(results.values()), "problems": results})
    if any(results.values()):
        raise typer.Exit(EXIT_USAGE)


@app.command()
@guarded
def show(
    file: Annotated[Path | None, typer.Argument(help="Recipe file (default: only the built-in defaults).")] = None,
    overrides: OverridesArg = None,
    json_out: JsonOpt = False,
) -> None:
    """Print the resolved recipe: defaults, then the file, then overrides, then the strategy preset."""
    if file is not None and "=" in str(file) and not file.exists():
        overrides, file = [str(file), *(overrides or [])], None
    recipe = load_recipe(file, overrides or [])
    if json_out:
        Output(True).emit_json({"recipe": recipe_to_dict(recipe), "preset": preset_settings(recipe)})
        return
    typer.echo(recipe_to_yaml(recipe), nl=False)
    fixed = preset_settings(recipe)
    if fixed:
        typer.echo(f"# strategy {recipe.strategy.name} sets: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
