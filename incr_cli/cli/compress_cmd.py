"""`incr compress`: distil a line's LATEST into a smaller student, written as v0000 of a new line."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from incr_cli.cli.output import JsonOpt, Output, OverridesArg, guarded
from incr_cli.config.recipe import load_recipe
from incr_cli.store.workspace import Workspace

# What compress trains with unless the command line says otherwise: DistilBERT's hidden-state
# cosine term beside the logit KD, and the distilling preset whatever the line's strategy is.
DEFAULTS = ["strategy.name=replay+distill", "distill.hidden_weight=1.0", "distill.hidden_loss=cosine"]


def compress_cmd(
    workspace: Annotated[Path, typer.Argument(help="The teacher's workspace.", show_default=False)],
    layers: Annotated[int, typer.Option("--layers", min=1, help="Encoder layers of the student.", show_default=False)],
    into: Annotated[Path, typer.Option("--into", help="New workspace for the student's line (must not exist).",
                                       show_default=False)],
    overrides: OverridesArg = None,
    hidden: Annotated[int | None, typer.Option("--hidden", help="Smaller hidden size (a multiple of the head size).",
                                               show_default=False)] = None,
    version: Annotated[str, typer.Option("--version", help="The teacher version.")] = "latest",
    json_out: JsonOpt = False,
) -> None:
    """Distil the teacher (LATEST) into a student with --layers layers, initialised from every
    (L/K)-th teacher layer, trained on every increment the teacher saw with MLM + logit distillation
    + hidden-state distillation (when the hidden sizes match). The student becomes v0000 of the new
    line --into (the recipe and data are carried over, the teacher recorded), which takes future
    increments like any line. Budget: train.steps (key=value overrides as for train-increment; the
    defaults add distill.hidden_weight=1 distill.hidden_loss=cosine). Reports parameters, weights on
    disk, encoder tokens/s and held-out perplexity and accuracy of both, per increment.
    """
    from incr_cli.methods.compress import StudentShape, compress

    out = Output(json_out)
    ws = Workspace.open(workspace)
    recipe = load_recipe(ws.recipe_path, [*DEFAULTS, *(overrides or [])])
    result = compress(ws, into, recipe, shape=StudentShape(layers, hidden), version=version, reporter=out)
    m = result.metrics
    if json_out:
        out.emit_json({"into": str(result.into), **{k: v for k, v in m.items() if k != "train_log"}})
        return
    out.table(f"{result.teacher} -> {result.into} v0000", ["", "teacher", "student", "student / teacher"],
              _rows(m))
    out.log(f"{result.into}: a new line at v0000 (teacher {ws.root} {result.teacher}); "
            f"next: incr ingest {shlex.quote(str(result.into))} ... && incr train-increment {shlex.quote(str(result.into))}")


def _rows(m: dict[str, Any]) -> list[list[str]]:
    from incr_cli.scoring.render import fmt

    t, s = m["teacher"], m["student"]

    def ratio(a: Any, b: Any) -> str:
        return f"{b / a:.2f}x" if a and b is not None else "-"

    rows = [["layers / hidden", f"{t['layers']} / {t['hidden']}", f"{s['layers']} / {s['hidden']}", ""],
            ["parameters", f"{t['parameters']:,}", f"{s['parameters']:,}", ratio(t["parameters"], s["parameters"])],
            ["weights on disk", f"{t['weights_bytes'] / 1e6:.1f} MB", f"{s['weights_bytes'] / 1e6:.1f} MB",
             ratio(t["weights_bytes"], s["weights_bytes"])],
            ["encoder tokens/s", f"{t['tokens_per_second'] or 0:,.0f}", f"{s['tokens_per_second'] or 0:,.0f}",
             ratio(t["tokens_per_second"], s["tokens_per_second"])]]
    for inc, ts in m["eval"]["teacher"].items():
        ss = m["eval"]["student"][inc]
        rows.append([f"{inc} perplexity", fmt("perplexity", ts["perplexity"]), fmt("perplexity", ss["perplexity"]),
                     ratio(ts["perplexity"], ss["perplexity"])])
        rows.append([f"{inc} accuracy", fmt("accuracy", ts["accuracy"]), fmt("accuracy", ss["accuracy"]),
                     ratio(ts["accuracy"], ss["accuracy"])])
    return rows


def register(app: typer.Typer) -> None:
    """Add `incr compress`."""
    app.command("compress")(guarded(compress_cmd))
