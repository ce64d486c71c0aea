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
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from incr_cli.errors import IntegrityError, Interrupted
from incr_cli.faults import fault_point
from incr_cli.metrics import gate_line
from incr_cli.recipe import TrackingConfig
from incr_cli.reporting import Reporter
from incr_cli.workspace import VERSION_RE, Workspace, read_lines

REGISTRY_ALIAS = "current"  # MLflow reserves "latest"; incr's `current` follows LATEST too
_NOT_SCALARS = ("step", "tokens")


@dataclass(frozen=True)
class RunInfo:
    version: str  # the version this run writes: the next one, fixed while the workspace lock is held
    parent: str
    key: str  # the run key: same key, same training
    new: list[str]
    recipe: dict[str, dict[str, Any]]


class Sink(Protocol):
    name: str

    def start(self, run: RunInfo, history: list[dict[str, Any]]) -> None: ...

    def step(self, line: dict[str, Any]) -> None: ...

    def finish(self, metrics: dict[str, Any], version_dir: Path) -> None: ...

    def close(self, status: str) -> None: ...


def train_scalars(line: dict[str, Any]) -> dict[str, float]:
    """One train_log.jsonl line -> {"train/<name>": value} (nulls left out)."""
    return {f"train/{k}": float(v) for k, v in line.items()
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def version_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """metrics.json -> held-out scores before/after per increment, forgetting, and the gate (1 = passed)."""
    out: dict[str, float] = {}
    for when in ("before", "after"):
        for inc, scores in metrics["eval"][when].items():
            out.update({f"eval/{when}/{inc}/{k}": float(v) for k, v in scores.items() if v is not None})
    out.update({f"forgetting/{inc}": float(v) for inc, v in metrics["forgetting"].items() if v is not None})
    for name, rec in ((metrics.get("tasks") or {}).get("tasks") or {}).items():
        for when in ("before", "after"):
            scores = rec.get(when) or {}
            out.update({f"task/{when}/{name}/{k.replace('@', '_at_')}": float(v) for k, v in scores.items()
                        if k in _TASK_SCALARS and isinstance(v, (int, float))})
    out["gate/passed"] = 1.0 if metrics["gate"]["passed"] else 0.0
    return out


_TASK_SCALARS = ("accuracy", "macro_f1", "recall@1", "recall@10", "mrr")


def _written_by(ws: Workspace, version: str, key: str | None) -> dict[str, Any] | None:
    """The metrics of ``version`` when the run with key ``key`` wrote it; None when it never got
    written (or another run wrote it)."""
    written = _written(ws, version)
    return written[1] if written is not None and written[0].get("run_key") == key else None


def _written(ws: Workspace, version: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(manifest, metrics) of a written version; None when ``version`` never got written."""
    if version not in ws.versions():
        return None
    try:
        manifest = ws.version_manifest(version)
        metrics = json.loads((ws.version_dir(version) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, IntegrityError):
        return None
    return (manifest, metrics) if isinstance(metrics, dict) else None


# ----------------------------------------------------------------------------- TensorBoard


class TensorBoardSink:
    """One run per version (``ROOT/vNNNN``) with the training curves and the version's scores, and
    a ``ROOT/line`` run with the scores at step = version number: the line's history across versions."""

    name = "tensorboard"
    FINISHED = "incr-finished"  # written last into a version's folder: without it a killed run left it

    def __init__(self, root: Path):
        self.root = root
        self.writer: Any = None
        self.version = ""

    def start(self, run: RunInfo, history: list[dict[str, Any]]) -> None:
        writer_type = _summary_writer()
        folder = self.root / run.version
        shutil.rmtree(folder, ignore_errors=True)  # written again from the history: no duplicated steps
        self.writer, self.version = writer_type(str(folder)), run.version
        self.writer.add_text("run", f"{run.version} from {run.parent}: new {', '.join(run.new)}; run key {run.key}")
        for line in history:
            self.step(line)

    def step(self, line: dict[str, Any]) -> None:
        for tag, value in train_scalars(line).items():
            self.writer.add_scalar(tag, value, line["step"])
        self.writer.flush()

    def finish(self, metrics: dict[str, Any], version_dir: Path) -> None:
        fault_point("tracking.finish")  # the version is written: a kill here leaves its folder without scores
        scalars = version_scalars(metrics)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, metrics["steps"])
        checks = "; ".join(gate_line(c) for c in metrics["gate"]["checks"])
        self.writer.add_text("gate", f"{metrics['version']} {metrics['status']}" + (f"; {checks}" if checks else ""))
        self.writer.close()
        number = int(metrics["version"].lstrip("v"))
        # purge_step: a version written again replaces its point instead of adding a second one
        line = _summary_writer()(str(self.root / "line"), purge_step=number)
        for tag, value in scalars.items():
            line.add_scalar(tag, value, number)
        line.close()
        (self.root / metrics["version"] / self.FINISHED).write_bytes(b"")

    def reconcile(self, ws: Workspace) -> None:
        """A version's folder a killed command left without its scores (no FINISHED mark) is written
        again from the version's own files, when the version was written; else a resume rewrites it
        or a fresh start replaces it."""
        folders = sorted(self.root.iterdir()) if self.root.is_dir() else []
        for folder in folders:
            if not VERSION_RE.match(folder.name) or (folder / self.FINISHED).exists():
                continue
            written = _written(ws, folder.name)
            if written is None:
                continue
            manifest, metrics = written
            log, _ = read_lines(ws.version_dir(folder.name) / "train_log.jsonl")
            self.start(RunInfo(folder.name, str(manifest.get("parent")), str(manifest.get("run_key")),
                               list(manifest.get("new") or []), {}), log)
            self.finish(metrics, ws.version_dir(folder.name))

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("tensorboard is not installed: pip install 'incr-cli[tensorboard]'") from None
    return SummaryWriter


# ----------------------------------------------------------------------------- MLflow


class MlflowSink:
    """One MLflow run per increment, found again by its version tag on a resume; on promotion the
    version folder is registered under ``registered_model`` with the alias ``current``."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, registered_model: str | None, artifact_root: str | None,
                 workspace: Path | None = None):
        self.uri, self.experiment, self.registered_model = uri, experiment, registered_model
        self.artifact_root = artifact_root
        # tagged on each run, so a store shared by several workspaces reconciles only this one's runs
        self.workspace = str(workspace.resolve()) if workspace is not None else None
        self.client: Any = None
        self.exp_id = ""
        self.run_id: str | None = None
        self.logged_until = -1  # the last step the run already holds
        self.done = False

    def _connect(self, *, create: bool = True) -> bool:
        """-> whether the experiment exists (made here with ``create``; the calls after promote and
        rollback only look, so a store that never saw a run gets no experiment from them)."""
        if self.client is None:
            try:
                from mlflow.tracking import MlflowClient
            except ImportError:
                raise ImportError("mlflow is not installed: pip install 'incr-cli[mlflow]'") from None
            # after the import, which sets mlflow's own logger to INFO: its lines (store creation and
            # migrations) are not incr's output
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        if not self.exp_id:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                self.exp_id = exp.experiment_id
            elif create:
                self.exp_id = self.client.create_experiment(self.experiment, artifact_location=self.artifact_root)
        return bool(self.exp_id)

    def _runs(self, exp_id: str, query: str) -> list[Any]:
        """Runs matching ``query`` that belong to this workspace. The workspace is compared here, not in
        the filter string: a path may hold any character, quotes included, which MLflow's filter
        syntax cannot always quote. Another workspace's runs in a shared store are none of ours."""
        found = self.client.search_runs([exp_id], filter_string=query)
        if not self.workspace:
            return list(found)
        return [r for r in found if r.data.tags.get("incr.workspace") == self.workspace]

    def start(self, run: RunInfo, history: list[dict[str, Any]]) -> None:
        self._connect()
        self.run_id = self._open_run(self.exp_id, run, resuming=bool(history))
        for line in history:
            self.step(line)

    def _open_run(self, exp_id: str, run: RunInfo, *, resuming: bool) -> str:
        """The version's run when this is the same run resuming; else a new one (earlier runs for this
        version never wrote it: a fresh start, other data or another recipe, so they are deleted)."""
        from mlflow.entities import Param

        found = self._runs(exp_id, f"tags.`incr.version` = '{run.version}'")
        for old in found:
            if resuming and old.data.tags.get("incr.run_key") == run.key and self.run_id is None:
                self.run_id = old.info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                history = self.client.get_metric_history(self.run_id, "train/total")
                self.logged_until = max((m.step for m in history), default=-1)
            else:
                self.client.delete_run(old.info.run_id)
        if self.run_id is not None:
            return self.run_id
        tags = {"incr.version": run.version, "incr.parent": run.parent, "incr.run_key": run.key,
                "incr.status": "training", "incr.new": ",".join(run.new)}
        if self.workspace:
            tags["incr.workspace"] = self.workspace
        run_id = self.client.create_run(exp_id, run_name=run.version, tags=tags).info.run_id
        params = [Param(f"{section}.{k}", str(v)) for section, keys in run.recipe.items() for k, v in keys.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[i:i + 100])
        return run_id

    def step(self, line: dict[str, Any]) -> None:
        if line["step"] <= self.logged_until:
            return
        self._log(train_scalars(line), line["step"])

    def _log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, metrics: dict[str, Any], version_dir: Path) -> None:
        fault_point("tracking.finish")  # the version is written: a kill here leaves the run RUNNING
        self._log(version_scalars(metrics), metrics["steps"])
        self.client.set_tag(self.run_id, "incr.status", metrics["status"])
        for name in ("metrics.json", "manifest.json"):
            self.client.log_artifact(self.run_id, str(version_dir / name))
        if metrics["promoted"] and self.registered_model:
            self._register(metrics["version"], version_dir)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.done = True

    def _register(self, version: str, version_dir: Path, run_id: str | None = None) -> None:
        """The alias ``current`` on ``version``'s model version, registered first when it never was
        (its source: the version folder, which is never modified)."""
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):  # it exists already
            self.client.create_registered_model(self.registered_model)
        source = str(version_dir.resolve())
        known = [mv for mv in self.client.search_model_versions(f"name = '{self.registered_model}'")
                 if mv.source == source]
        if known:
            number = max(int(mv.version) for mv in known)
        else:
            number = self.client.create_model_version(self.registered_model, source=source, run_id=run_id or self.run_id,
                                                      tags={"incr.version": version}).version
        self.client.set_registered_model_alias(self.registered_model, REGISTRY_ALIAS, number)

    # ------------------------------------------------------------------------- after the run

    def reconcile(self, ws: Workspace) -> None:
        """Runs of this workspace a killed command left RUNNING (called under the workspace lock, so
        none is really running): one whose version was written is completed from the version's own
        files (the steps and scores it misses, artifacts, status; registered if it was promoted and is
        LATEST or about to be) and FINISHED; one whose version never got written is KILLED (a resume
        reopens it)."""
        if not self.workspace or not self._connect(create=False):
            return
        stale = self._runs(self.exp_id, "attributes.status = 'RUNNING'")
        for old in stale:
            version, key = old.data.tags.get("incr.version", ""), old.data.tags.get("incr.run_key")
            written = _written_by(ws, version, key)
            if written is None:
                self.client.set_terminated(old.info.run_id, "KILLED")
                continue
            self._complete(old, ws, version, written)

    def _complete(self, old: Any, ws: Workspace, version: str, metrics: dict[str, Any]) -> None:
        run_id, folder = old.info.run_id, ws.version_dir(version)
        held = self.client.get_metric_history(run_id, "train/total")
        until = max((m.step for m in held), default=-1)
        log, _ = read_lines(folder / "train_log.jsonl")
        self.run_id = run_id
        for line in log:
            if isinstance(line.get("step"), int) and line["step"] > until:
                self._log(train_scalars(line), line["step"])
        if "gate/passed" not in old.data.metrics:  # the scores are logged once
            self._log(version_scalars(metrics), metrics["steps"])
        self.client.set_tag(run_id, "incr.status", metrics["status"])
        present = {a.path for a in self.client.list_artifacts(run_id)}
        for name in ("metrics.json", "manifest.json"):
            if name not in present:
                self.client.log_artifact(run_id, str(folder / name))
        # LATEST is the version, or still its parent when the kill came before LATEST moved (this
        # command completes that move); a version LATEST has left since is not registered now
        if metrics["promoted"] and self.registered_model and ws.latest() in (version, metrics.get("parent")):
            self._register(version, folder, run_id)
        self.client.set_terminated(run_id, "FINISHED")
        self.run_id = None

    def follow_latest(self, ws: Workspace) -> None:
        """After promote / rollback: the alias ``current`` moves to LATEST, registering it when it
        never was (a version the gate rejected, the root)."""
        if not self.registered_model:
            return
        version = ws.latest()
        runs = []
        if self._connect(create=False):  # the version's run, when it was tracked
            key = ws.version_manifest(version).get("run_key")
            runs = self.client.search_runs([self.exp_id], filter_string=(
                f"tags.`incr.version` = '{version}' and tags.`incr.run_key` = '{key}'"))
        self._register(version, ws.version_dir(version), runs[0].info.run_id if runs else None)

    def close(self, status: str) -> None:
        if self.run_id is not None and not self.done:
            self.client.set_terminated(self.run_id, status)


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
        sinks.append(_mlflow_sink(config, workspace))
    return sinks


def _mlflow_sink(config: TrackingConfig, workspace: Path) -> MlflowSink:
    # default: everything inside the workspace; a server keeps the artifacts where it is told to
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workspace / 'mlflow.db').resolve()}"
    local = not uri.startswith(("http://", "https://", "databricks"))
    artifacts = (workspace / "mlflow-artifacts").resolve().as_uri() if local else None
    return MlflowSink(uri, config.mlflow_experiment, config.registered_model, artifacts, workspace)


def mlflow_configured(workspace: Path) -> bool:
    """Whether the workspace has an MLflow store: $MLFLOW_TRACKING_URI, or WS/mlflow.db from a tracked run."""
    return bool(os.environ.get("MLFLOW_TRACKING_URI")) or (workspace / "mlflow.db").is_file()


def follow_latest(config: TrackingConfig, ws: Workspace, reporter: Reporter) -> None:
    """After promote / rollback, when MLflow is configured for the workspace: close the runs a killed
    command left open and move the registry's alias ``current`` to LATEST (with
    ``tracking.registered_model``). Bounded by ``tracking.flush_timeout``; a failure only warns."""
    if not mlflow_configured(ws.root):
        return
    tracker = Tracker([_mlflow_sink(config, ws.root)], reporter, config.flush_timeout)
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


__all__ = ["RunInfo", "Sink", "Tracker", "TensorBoardSink", "MlflowSink", "build_sinks", "session", "follow_latest",
           "mlflow_configured", "train_scalars", "version_scalars"]
