"""Dashboards: each increment sent to TensorBoard and/or MLflow, behind one small interface.

A sink gets its calls from one background thread, so a slow or dead dashboard never holds up
training: ``start(run, history)`` when the run starts or resumes, ``step(line)`` per log line,
``finish(metrics, version_dir)`` once the version is written, ``close(status)`` at the end.
``history`` holds the log lines the run already wrote before a resume, so a resumed run shows as
one continuous run per version: TensorBoard rewrites the version's folder from them, MLflow goes
on with the version's run and skips the steps it already holds (after a kill -9 it may hold a few
more than the resumable state). A sink that raises is dropped with one warning line; the version's
own files (``metrics.json``, ``train_log.jsonl``) stay the record.

``reconcile(ws)``, first in every train-increment (and, MLflow only, promote and rollback),
completes what a killed command left open: TensorBoard writes a version's folder that has no
FINISHED mark again from the version's files; MLflow completes the workspace's RUNNING runs from
them when the version was written, else marks them KILLED. ``follow_latest(ws)`` (MLflow) moves
the registry's alias ``current`` to LATEST after promote / rollback.

Names: ``train/<loss term>``, ``train/total``, ``train/grad_norm``, ``train/lr``,
``train/tokens_per_second``, ``train/mfu`` at each log step; ``eval/before/<increment>/<score>``,
``eval/after/...``, ``forgetting/<increment>``, ``task/before|after/<task>/<score>`` and ``gate/passed`` (1 or 0) at the last step.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from incr_cli.config.recipe import TrackingConfig
from incr_cli.errors import Interrupted
from incr_cli.progress import Reporter
from incr_cli.store.workspace import Workspace
from incr_cli.tracking.base import RunInfo, Sink
from incr_cli.tracking.mlflow_sink import build_mlflow_sink, mlflow_configured
from incr_cli.tracking.tensorboard_sink import TensorBoardSink

# ----------------------------------------------------------------------------- the tracker


class Tracker:
    """Hands every call to the sinks on one background thread; a sink that raises is dropped with
    one warning. With no sinks every call is a no-op (the default, and ranks other than 0)."""

    def __init__(self, sinks: list[Sink], reporter: Reporter, flush_timeout: float = 60.0):
        self.sinks = list(sinks)
        self.reporter, self.flush_timeout = reporter, flush_timeout
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if self.sinks:
            self._thread = threading.Thread(target=self._work, name="incr-tracking", daemon=True)
            self._thread.start()

    def start(self, run: RunInfo, history: list[dict[str, Any]]) -> None:
        self._put("start", run, [dict(line) for line in history])

    def step(self, line: dict[str, Any]) -> None:
        self._put("step", dict(line))

    def finish(self, metrics: dict[str, Any], version_dir: Path) -> None:
        self._put("finish", metrics, version_dir)

    def reconcile(self, ws: Workspace) -> None:
        """Complete what a killed command left open in the dashboards (runs, a version's scores)."""
        self._put("reconcile", ws)

    def follow_latest(self, ws: Workspace) -> None:
        """Point the registry at LATEST after promote / rollback (MLflow)."""
        self._put("follow_latest", ws)

    def close(self, status: str = "FINISHED") -> None:
        """Wait up to ``flush_timeout`` seconds for the sinks to send what is queued, then go on.
        ``status``: how the run ended (MLflow's FINISHED, FAILED or KILLED)."""
        if self._thread is None:
            return
        self._put("close", status)
        self._queue.put(None)
        self._thread.join(self.flush_timeout)
        if self._thread.is_alive():
            names = ", ".join(s.name for s in self.sinks)
            self.reporter.warn(f"tracking: {names} still sending after {self.flush_timeout:g} s "
                               "(tracking.flush_timeout); left behind, the version's own files are the record")
        self._thread = None

    def _put(self, method: str, *args: Any) -> None:
        if self._thread is not None:
            self._queue.put((method, args))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            method, args = item
            for sink in list(self.sinks):
                call = getattr(sink, method, None)
                if call is None:  # a call only some sinks take (follow_latest: MLflow only)
                    continue
                try:
                    call(*args)
                except Exception as exc:  # noqa: BLE001 - a dashboard never fails an increment
                    self.sinks.remove(sink)
                    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                    self.reporter.warn(f"tracking: {sink.name} failed and is off for this run ({reason}); "
                                       "training goes on, the version's own files are the record")


def build_sinks(config: TrackingConfig, workspace: Path) -> list[Sink]:
    """The recipe's sinks; nothing is imported here (a missing package is the sink's first failure)."""
    sinks: list[Sink] = []
    if "tensorboard" in config.sinks:
        sinks.append(TensorBoardSink(workspace / "tensorboard"))
    if "mlflow" in config.sinks:
        sinks.append(build_mlflow_sink(config, workspace))
    return sinks


def follow_latest(config: TrackingConfig, ws: Workspace, reporter: Reporter) -> None:
    """After promote / rollback, when MLflow is configured for the workspace: close the runs a killed
    command left open and move the registry's alias ``current`` to LATEST (with
    ``tracking.registered_model``). Bounded by ``tracking.flush_timeout``; a failure only warns."""
    if not mlflow_configured(ws.root):
        return
    tracker = Tracker([build_mlflow_sink(config, ws.root)], reporter, config.flush_timeout)
    tracker.reconcile(ws)
    tracker.follow_latest(ws)
    tracker.close()


@contextlib.contextmanager
def session(config: TrackingConfig, workspace: Path, reporter: Reporter, *, enabled: bool) -> Iterator[Tracker]:
    """A tracker for one train-increment run, closed (bounded wait) however the run ends."""
    tracker = Tracker(build_sinks(config, workspace) if enabled else [], reporter, config.flush_timeout)
    try:
        yield tracker
    except Interrupted:
        tracker.close("KILLED")  # resumable: the rerun sets the run going again
        raise
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")
