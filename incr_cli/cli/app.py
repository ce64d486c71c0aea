"""The `incr` Typer app: global options, exit codes, and the command groups."""

from __future__ import annotations

from typing import Annotated

import typer

from incr_cli import __version__
from incr_cli.cli import (
    compress_cmd,
    embed_cmd,
    eval_cmd,
    ingest_cmd,
    line_cmd,
    predict_cmd,
    recipe_cmd,
    train_cmd,
    workspace_cmd,
)
from incr_cli.cli.output import STATE

EXIT_CODES_HELP = """
Exit codes: 0 ok; 1 unexpected failure, non-finite loss, out of memory, no space left on device
or a lost torchrun rank (one-line summary, traceback with --debug); 2 bad usage, recipe, input or a corrupt file (the message names it);
3 the new version failed the gate (written, not promoted); 75 workspace locked by another
process; 130/143 interrupted by SIGINT/SIGTERM (resumable state saved).
"""

app = typer.Typer(
    name="incr",
    help="Continual masked-language-model fine-tuning of BERT-family encoders: each increment trains "
    "on new text with the previous version as teacher and replay of older text, and writes a new "
    "versioned checkpoint with honest forgetting metrics.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"incr {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of unexpected failures.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    STATE.debug = debug


workspace_cmd.register(app)
ingest_cmd.register(app)
train_cmd.register(app)
eval_cmd.register(app)
predict_cmd.register(app)
embed_cmd.register(app)
compress_cmd.register(app)
line_cmd.register(app)
app.add_typer(recipe_cmd.app, name="recipe")


def main() -> None:
    """The console script: the app, with Click's own usage errors (unknown option, missing argument)
    clipped like every other message, so a 10 kB option name cannot flood a log."""
    import sys

    from incr_cli.errors import clip

    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        sys.stderr.write("Aborted!\n")
        sys.exit(1)
    except Exception as exc:  # Click's errors (typer vendors its own Click): message, show(), exit_code
        if not all(hasattr(exc, a) for a in ("message", "show", "exit_code")):
            raise
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one's message is the help itself
            exc.message = clip(str(exc.message))
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
