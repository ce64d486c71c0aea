"""The reporter protocol the library uses to talk to the user without knowing about the CLI.

``incr_cli.cli.output.Output`` implements it (rich / plain / JSON-mode stderr); tests and library
callers that want silence pass ``Quiet()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol


class ProgressLike(Protocol):
    def advance(self, amount: float = 1, info: str | None = None) -> None: ...


class Reporter(Protocol):
    def log(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None: ...

    def progress(self, description: str, total: float | None, unit: str = "") -> AbstractContextManager[ProgressLike]: ...


class _NoProgress:
    def advance(self, amount: float = 1, info: str | None = None) -> None:
        pass


class Quiet:
    """A reporter that says nothing (library use and tests)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def log(self, message: str) -> None:
        self.messages.append(message)

    def warn(self, message: str) -> None:
        self.messages.append("warning: " + message)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        pass

    @contextmanager
    def progress(self, description: str, total: float | None, unit: str = "") -> Iterator[ProgressLike]:
        yield _NoProgress()
