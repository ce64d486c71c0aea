"""The Python API: what the CLI does, for a program (an Airflow or Prefect task, a notebook).

    import incr_cli
    incr_cli.init("ws", base="scratch:tiny")
    incr_cli.ingest("ws", ["notes.txt"])
    result = incr_cli.train_increment("ws", overrides=["train.steps=20"])
    print(result.version, result.promoted, result.metrics_path)

Every function takes the workspace path first, takes the workspace lock itself where it writes,
returns a typed result and raises the typed errors of ``incr_cli.errors`` (each has the CLI's exit
code as ``.exit_code``: 2 usage or input, 75 locked, 1 failure). It is silent unless given
``on_message``, a callable that receives each line the CLI would log (warnings start with
"warning: "), or a ``reporter`` (``incr_cli.progress.Reporter``: the CLI passes its rich / plain /
JSON output, so each command is argument parsing and rendering over these functions). A gate rejection is not an error here: the version is written, and the result says
``promoted=False`` with the failed checks in ``metrics["gate"]``.

Heavy modules (torch, transformers) are imported inside the functions that need them, so that
``import incr_cli`` stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from incr_cli.config.recipe import Recipe, load_recipe
from incr_cli.errors import GateRejected
from incr_cli.progress import ProgressLike, Quiet, Reporter
from incr_cli.store.workspace import Workspace

if TYPE_CHECKING:
    from incr_cli.data.ingest import IngestResult
    from incr_cli.line.export import ExportResult
    from incr_cli.line.lifecycle import Move
    from incr_cli.model.weights import InitResult
    from incr_cli.scoring.result import EvalResult

__all__ = ["Increment", "evaluate", "export", "ingest", "init", "promote", "rollback", "train_increment"]

OnMessage = Callable[[str], None]


class _Forward(Quiet):
    """A reporter that hands every line to ``on_message`` (and keeps them, as ``Quiet`` does)."""

    def __init__(self, on_message: OnMessage | None) -> None:
        super().__init__()
        self.on_message = on_message

    def log(self, message: str) -> None:
        super().log(message)
        if self.on_message is not None:
            self.on_message(message)

    def warn(self, message: str) -> None:
        self.log("warning: " + message)

    @contextmanager
    def progress(self, description: str, total: float | None, unit: str = "") -> Iterator[ProgressLike]:
        self.log(f"{description}...")
        with super().progress(description, total, unit) as bar:
            yield bar


def _reporter(reporter: Reporter | None, on_message: OnMessage | None) -> Reporter:
    return reporter if reporter is not None else _Forward(on_message)


def _recipe(ws: Workspace, recipe: str | Path | None, overrides: Sequence[str]) -> Recipe:
    return load_recipe(Path(recipe) if recipe is not None else ws.recipe_path, list(overrides))


def init(workspace: str | Path, base: str, *, recipe: str | Path | None = None, overrides: Sequence[str] = (),
         force: bool = False, allow_pickle: bool = False, on_message: OnMessage | None = None,
         reporter: Reporter | None = None) -> InitResult:
    """``incr init``: a workspace at ``workspace`` with ``base`` as v0000 -> ``InitResult`` (``.version``)."""
    from incr_cli.model.weights import init_workspace

    resolved = load_recipe(Path(recipe) if recipe is not None else None, list(overrides))
    return init_workspace(workspace, base, resolved, force=force, allow_pickle=allow_pickle,
                          reporter=_reporter(reporter, on_message))


def ingest(workspace: str | Path, paths: Iterable[str | Path] = (), *, name: str | None = None, fmt: str = "auto",
           text_field: str = "text", overrides: Sequence[str] = (), recipe: str | Path | None = None,
           on_message: OnMessage | None = None, reporter: Reporter | None = None, **options: Any) -> IngestResult:
    """``incr ingest``: ``paths`` as the next increment -> ``IngestResult`` (``.increment`` None when
    nothing new). ``options``: ``allow_unknown``, ``extend_vocab``, ``dry_run`` as on the CLI, and
    ``dataset`` (``NAME[:CONFIG]`` in the local Hugging Face cache) with ``split`` (default train)."""
    from incr_cli.data import hf_cache
    from incr_cli.data.ingest import IngestOptions
    from incr_cli.data.ingest import ingest as ingest_paths
    from incr_cli.errors import UsageError

    ws = Workspace.open(workspace)
    resolved = _recipe(ws, recipe, overrides)
    report = _reporter(reporter, on_message)
    paths = [str(p) for p in paths]
    dataset, split = options.pop("dataset", None), options.pop("split", "train")
    if dataset:
        found = hf_cache.find(dataset, split)
        report.log(f"{found.label}: {len(found.files)} file(s) from the {found.cache} cache, {found.folder}")
        paths += found.files
        name = name or found.name.split("/")[-1]
    if not paths:
        raise UsageError("nothing to ingest: give files, directories, - for standard input, or --dataset NAME")
    with ws.lock("ingest"):
        chosen = IngestOptions(name, fmt, text_field, **options)
        return ingest_paths(ws, paths, recipe=resolved, options=chosen, reporter=report)


@dataclass(frozen=True)
class Increment:
    """What ``train_increment`` did. ``version`` is None when nothing was pending."""

    workspace: Path
    parent: str
    version: str | None
    promoted: bool
    message: str
    metrics: dict[str, Any] | None = field(default=None, repr=False)
    plan: Any = field(default=None, repr=False)  # training.plan.IncrementPlan: what was (or would be) trained
    recipe: Recipe | None = field(default=None, repr=False)  # the resolved recipe it ran with

    @property
    def nothing_to_train(self) -> bool:
        return self.plan is not None and self.plan.nothing_to_train

    @property
    def metrics_path(self) -> Path | None:
        """``checkpoints/VERSION/metrics.json`` of the new version (None when nothing was trained)."""
        return None if self.version is None else Workspace(self.workspace).version_dir(self.version) / "metrics.json"

    @property
    def task_scores(self) -> dict[str, Any]:
        """The new version's downstream task scores, by task name ({} without ``eval.tasks``)."""
        tasks = ((self.metrics or {}).get("tasks") or {}).get("tasks") or {}
        return {name: entry["after"] for name, entry in tasks.items() if entry.get("after")}


def train_increment(workspace: str | Path, *, overrides: Sequence[str] = (), recipe: str | Path | None = None,
                    parent: str | None = None, dry_run: bool = False, on_message: OnMessage | None = None,
                    reporter: Reporter | None = None) -> Increment:
    """``incr train-increment``: train what is pending into a new version, gate it, promote it when
    it passes -> ``Increment``. Raises ``TrainingFailed`` (non-finite loss, out of memory),
    ``WorkspaceLocked``, ``Interrupted``; rerunning after a crash resumes, as on the CLI. ``dry_run``
    plans and trains nothing. Under torchrun every rank calls it; rank 0 takes the lock and writes."""
    from contextlib import nullcontext

    from incr_cli.line.increment import train_increment as train
    from incr_cli.runtime import distributed

    ws = Workspace.open(workspace)
    resolved = _recipe(ws, recipe, overrides)
    report = _reporter(reporter, on_message)
    if dry_run:
        result = train(ws, resolved, parent=parent, reporter=report, dry_run=True)
        return Increment(ws.root, result.plan.parent, None, False, result.message, None, result.plan, resolved)
    try:
        with ws.lock("train-increment") if distributed.env_rank() == 0 else nullcontext():
            result = train(ws, resolved, parent=parent, reporter=report)
    except GateRejected as exc:
        result = getattr(exc, "result", None)
        if result is None:
            raise
        message = str(exc)
    else:
        message = result.message
    return Increment(ws.root, result.plan.parent, result.version, result.promoted, message, result.metrics,
                     result.plan, resolved)


def evaluate(workspace: str | Path, *, versions: str = "promoted", data: str | None = None,
             texts: Sequence[str | Path] = (), overrides: Sequence[str] = (), recipe: str | Path | None = None,
             device: str | None = None, use_cache: bool = True, out: str | Path | None = None,
             on_message: OnMessage | None = None, reporter: Reporter | None = None) -> EvalResult:
    """``incr eval``: score versions on every increment's held-out split (and ``texts``), with the
    recipe's downstream tasks -> ``EvalResult`` (``.scores[version][increment]``, ``.summaries``,
    ``.tasks``). Saved under ``WS/eval/`` as the CLI does (``.saved``; None on a read-only
    workspace) and to ``out`` when given; takes no lock."""
    from incr_cli.scoring import probe
    from incr_cli.scoring.evaluate import EvalGrid, save_result, select_increments, select_versions
    from incr_cli.scoring.evaluate import evaluate as score

    ws = Workspace.open(workspace)
    resolved = _recipe(ws, recipe, [*overrides, *([f"runtime.device={device}"] if device else [])])
    report = _reporter(reporter, on_message)
    tasks = probe.load_tasks(resolved)  # a bad task file fails first
    chosen = select_versions(ws, versions)
    increments = [] if data is None and texts else select_increments(ws, data)
    grid = EvalGrid(chosen, increments, [Path(t) for t in texts])
    result = score(ws, grid, resolved, reporter=report, use_cache=use_cache)
    probe.add_task_scores(ws, result, resolved, tasks, reporter=report, use_cache=use_cache)
    result.saved = save_result(ws, result, Path(out) if out is not None else None)
    return result


def promote(workspace: str | Path, version: str, *, reason: str | None = None,
            on_message: OnMessage | None = None, reporter: Reporter | None = None) -> Move:
    """``incr promote``: make ``version`` LATEST (its files verified first) -> ``Move``."""
    from incr_cli.line import lifecycle

    return lifecycle.promote(Workspace.open(workspace), version, reason=reason,
                             reporter=_reporter(reporter, on_message))


def rollback(workspace: str | Path, *, reason: str | None = None, on_message: OnMessage | None = None,
             reporter: Reporter | None = None) -> Move:
    """``incr rollback``: LATEST goes back to the version it named before -> ``Move``."""
    from incr_cli.line import lifecycle

    return lifecycle.rollback(Workspace.open(workspace), reason=reason, reporter=_reporter(reporter, on_message))


def export(workspace: str | Path, out: str | Path, *, version: str | None = None, dtype: str = "fp32",
           quantize: str | None = None, file_format: str = "safetensors") -> ExportResult:
    """``incr export``: ``version`` (default LATEST) as a self-contained folder ``out`` -> ``ExportResult``."""
    from incr_cli.line.export import export_version

    return export_version(Workspace.open(workspace), version, Path(out), dtype=dtype, quantize=quantize,
                          file_format=file_format)
