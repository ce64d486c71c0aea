"""Errors a user can cause, each mapped to a documented exit code by the CLI.

Tracebacks are for bugs: anything a user can fix is raised as one of these, with a one-line
message that names the file, key, version or path and says what to do.
"""

from __future__ import annotations

import reprlib
from typing import Any

# Exit codes (documented in `incr --help` and docs/commands.md).
EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected failure, non-finite loss, out of memory
EXIT_USAGE = 2  # bad usage, recipe, input, or integrity problem
EXIT_REJECTED = 3  # a version was written but failed the gate; LATEST did not move
EXIT_LOCKED = 75  # EX_TEMPFAIL: another process holds the workspace lock
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


# A value echoed in a message is cut to this many characters: a 60 MB line, a hostile path or a
# recipe whose aliases expand to hundreds of MB must never flood a terminal or a cron log.
MAX_SHOWN_CHARS = 200
# A recipe with more problems than this lists the first ones and counts the rest.
MAX_PROBLEMS = 20


def clip(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` as it is when short; else its first ``limit`` characters, "..." and its full size."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


class _BoundedRepr(reprlib.Repr):
    """``repr`` that stops early: nested and aliased containers are abbreviated, never expanded whole."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 8, 8, 8, 8
        self.maxstring = self.maxother = self.maxlong = MAX_SHOWN_CHARS

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 3 * self.maxlong:  # also past Python's limit on int -> str conversion
            return f"<an integer of {x.bit_length():,} bits>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()


def shown(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """``repr(value)`` for a message, bounded whatever the value: a string is cut to ``limit``
    characters (with "..." and its full size), a container abbreviated, the result clipped."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    return clip(_REPR.repr(value), limit)


class IncrError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_USAGE
    every_rank = False  # under torchrun only rank 0 prints the error line, unless this is True


class UsageError(IncrError):
    """Bad arguments: unknown version, unknown increment, not a workspace."""


class RecipeError(IncrError):
    """One or more problems in a recipe; ``problems`` holds them (the first ``MAX_PROBLEMS``, each clipped)."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        problems = [clip(p, 4 * MAX_SHOWN_CHARS) for p in problems]  # a key path and a value, each bounded
        total = len(problems)
        if total > MAX_PROBLEMS:  # thousands of bad keys: the first ones say what is wrong
            problems[MAX_PROBLEMS:] = [f"... and {len(problems) - MAX_PROBLEMS:,} more problems"]
        self.problems = problems
        head = f"{clip(source)}: {total:,} problem{'s' if total != 1 else ''}"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in problems))


class InputError(IncrError):
    """Input data that cannot be used at all (nothing readable, wrong format)."""


class IntegrityError(IncrError):
    """A version or increment whose files do not match their manifest."""


class WorkspaceLocked(IncrError):
    exit_code = EXIT_LOCKED


class GateRejected(IncrError):
    """The new version was written but failed the gate."""

    exit_code = EXIT_REJECTED


class TrainingFailed(IncrError):
    """Training could not finish (non-finite loss, out of memory); nothing was promoted."""

    exit_code = EXIT_FAILURE


class DiskFull(IncrError):
    """A write ran out of space (or quota). Nothing half-written is kept; the same command reruns
    once space is back. Raised by ``diskspace.disk_writes`` at each write site."""

    exit_code = EXIT_FAILURE

    def __init__(self, what: str, where: object, needs: int | None = None):
        self.what, self.where, self.needs = what, str(where), needs
        need = f", needs ~{megabytes(needs)} MB" if needs and needs >= 50_000 else ""  # not for a few kB
        super().__init__(f"no space left on device: {what}, {where}{need}; free space and rerun the same command")


class RankLost(TrainingFailed):
    """A collective failed or timed out under torchrun: another rank died, hung or was stopped.
    Every rank that survives says so (not only rank 0, which may be the one that died)."""

    every_rank = True


def megabytes(n: int) -> str:
    """``n`` bytes as MB for a message: one decimal below 10 MB (tiny models), whole MB above."""
    return f"{n / 1e6:.1f}" if n < 10e6 else f"{n / 1e6:,.0f}"


class Interrupted(IncrError):
    """SIGINT/SIGTERM received; resumable state was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = EXIT_SIGINT if signum == 2 else EXIT_SIGTERM
