"""Errors a user can cause, each mapped to a documented exit code by the CLI.

Tracebacks are for bugs: anything a user can fix is raised as one of these, with a one-line
message that names the file, key, version or path and says what to do.
"""

from __future__ import annotations

# Exit codes (documented in `incr --help` and the README).
EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected failure, non-finite loss, out of memory
EXIT_USAGE = 2  # bad usage, recipe, input, or integrity problem
EXIT_REJECTED = 3  # a version was written but failed the gate; LATEST did not move
EXIT_LOCKED = 75  # EX_TEMPFAIL: another process holds the workspace lock
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class IncrError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_USAGE


class UsageError(IncrError):
    """Bad arguments: unknown version, unknown increment, not a workspace."""


class RecipeError(IncrError):
    """One or more problems in a recipe; ``problems`` holds every one of them."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        head = f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
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


class Interrupted(IncrError):
    """SIGINT/SIGTERM received; resumable state was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = EXIT_SIGINT if signum == 2 else EXIT_SIGTERM
