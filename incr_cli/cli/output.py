"""Output for three audiences: rich on a terminal, plain log lines for cron, one JSON object for scripts.

Commands call ``guarded`` around their body so that every ``IncrError`` becomes one clear line on
stderr and its documented exit code; unexpected exceptions become a one-line summary (exit 1) with
the traceback shown only under ``--debug``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from incr_cli.errors import EXIT_FAILURE, EXIT_SIGINT, IncrError, clip
from incr_cli.store import diskspace

# Shared options (Annotated types, reused by every command that takes them).
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (for scripts); logs go to stderr.")]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Recipe overrides, section.key=value (typed like YAML scalars), e.g. train.steps=100.",
                   show_default=False),
]


@dataclass
class _State:
    debug: bool = False


STATE = _State()
F = TypeVar("F", bound=Callable[..., Any])


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def guarded(fn: F) -> F:
    """Map library errors to one line on stderr and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except IncrError as exc:
            if STATE.debug:
                traceback.print_exc()
            _error_line(str(exc), every_rank=exc.every_rank)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _error_line("interrupted")
            raise typer.Exit(EXIT_SIGINT) from None
        except Exception as exc:  # a bug or an environment failure: one line, traceback on --debug
            if STATE.debug:
                traceback.print_exc()
            disk_full = diskspace.unattributed(exc)  # a write site that does not name itself
            if disk_full is not None:
                _error_line(str(disk_full))
            elif _is_oom(exc):
                _error_line(f"out of memory: {_first_line(exc) or type(exc).__name__}; "
                            "lower train.batch_size (raise train.grad_accum to keep the effective batch) "
                            "or model.max_seq_len")
            else:
                _error_line(f"unexpected failure: {type(exc).__name__}: {_first_line(exc)} "
                            "(rerun with --debug for the traceback)")
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper  # type: ignore[return-value]


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return clip(text.splitlines()[0]) if text else ""


# The last guard on what reaches a terminal or a cron log; each value in a message is already cut
# to errors.MAX_SHOWN_CHARS where it is echoed, so only a bug could make these bite.
MAX_LINE_CHARS = 2000
MAX_LINES = 40


def bounded_lines(message: str) -> list[str]:
    """``message`` split into lines, each cut to MAX_LINE_CHARS, at most MAX_LINES of them."""
    lines = [clip(line, MAX_LINE_CHARS) for line in message.splitlines()[: MAX_LINES + 1]] or [""]
    if len(lines) > MAX_LINES:
        lines[MAX_LINES:] = ["..."]
    return lines


def _error_line(message: str, every_rank: bool = False) -> None:
    rank = os.environ.get("RANK", "0")
    if rank != "0" and not every_rank:  # under torchrun, rank 0 speaks for all ranks
        return
    lines = bounded_lines(message)
    sys.stderr.write(f"error: {lines[0]}\n")
    for line in lines[1:]:
        sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


class Output:
    """Where a command's human output goes. ``json_mode`` sends logs to stderr and keeps stdout for JSON."""

    def __init__(self, json_mode: bool = False, *, force_tty: bool | None = None):
        self.json_mode = json_mode
        stream = sys.stderr if json_mode else sys.stdout
        self.is_tty = stream.isatty() if force_tty is None else force_tty
        self.console = Console(file=stream, highlight=False, soft_wrap=True, force_terminal=self.is_tty or None)

    def log(self, message: str) -> None:
        """A status line: rich on a terminal, timestamped plain text otherwise. ``message`` is plain
        text (it names user paths: ``[x]/a.txt`` must print as it is, not as rich markup)."""
        if self.is_tty:
            self.console.print(message, markup=False)
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.console.file.write(f"{stamp} incr: {message}\n")
            self.console.file.flush()

    def warn(self, message: str) -> None:
        sys.stderr.write(f"warning: {chr(10).join(bounded_lines(message))}\n")
        sys.stderr.flush()

    def error(self, message: str) -> None:
        """A problem the command reports and goes on from (it exits non-zero at the end)."""
        sys.stderr.write(f"error: {chr(10).join(bounded_lines(message))}\n")
        sys.stderr.flush()

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A rich table on a terminal; aligned plain text otherwise (never in JSON mode's stdout).
        Cells may hold rich markup (``[bold]``): user text in a cell goes through ``rich.markup.escape``."""
        if self.is_tty:
            table = Table(title=title)
            for col in columns:
                table.add_column(col)
            for row in rows:
                table.add_row(*[_rich_cell(str(c)) for c in row])
            self.console.print(table)
            return
        cells = [list(columns)] + [[_strip_markup(str(c)) for c in row] for row in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
        lines = [title] if title else []
        for r in cells:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        self.console.file.write("\n".join(lines) + "\n")
        self.console.file.flush()

    def emit_json(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        sys.stdout.flush()

    @contextmanager
    def progress(self, description: str, total: float | None, unit: str = "") -> Iterator[ProgressHandle]:
        """A progress bar on a terminal; off one (cron) a plain line every ``PLAIN_EVERY`` seconds and
        at the end: counts with thousands separators, the share done and the time left."""
        if self.is_tty:
            columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
            with Progress(*columns, console=self.console, transient=False) as prog:
                task = prog.add_task(description, total=total, info="")
                yield ProgressHandle(lambda adv, info: prog.update(task, advance=adv, info=info or ""))
        else:
            state = {"done": 0.0, "last": time.monotonic(), "start": time.monotonic()}

            def update(advance: float, info: str | None) -> None:
                state["done"] += advance
                now = time.monotonic()
                if now - state["last"] >= PLAIN_EVERY or (total and state["done"] >= total):
                    state["last"] = now
                    line = plain_progress(description, state["done"], total, unit, info, now - state["start"])
                    self.log(line)

            yield ProgressHandle(update)


PLAIN_EVERY = 10.0  # seconds between plain progress lines off a terminal


def plain_progress(description: str, done: float, total: float | None, unit: str, info: str | None,
                   elapsed: float) -> str:
    """``tokenizing: 29,000/1,997,700 docs (1.5%, about 2 h 05 min left) INFO``: one cron log line."""
    count = f"{done:,.0f}" + (f"/{total:,.0f}" if total else "") + (f" {unit}" if unit else "")
    if total and 0 < done < total and elapsed > 0:
        count += f" ({done / total:.1%}, about {_duration(elapsed * (total - done) / done)} left)"
    elif total and done >= total:
        count += f" (100%, {_duration(elapsed)})"
    return f"{description}: {count} {info or ''}".rstrip()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


class ProgressHandle:
    def __init__(self, update: Callable[[float, str | None], None]):
        self._update = update

    def advance(self, amount: float = 1, info: str | None = None) -> None:
        self._update(amount, info)


def _strip_markup(text: str) -> str:
    from rich.errors import MarkupError
    from rich.text import Text

    if "[" not in text:
        return text
    try:
        return Text.from_markup(text).plain
    except MarkupError:  # not markup after all: show it as it is
        return text


def _rich_cell(text: str) -> Any:
    from rich.errors import MarkupError
    from rich.text import Text

    try:
        return Text.from_markup(text)
    except MarkupError:
        return Text(text)
