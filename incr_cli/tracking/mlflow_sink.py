"""The MLflow sink: one run a version, its metrics, params and tags, and the registered model whose
``current`` alias follows LATEST."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from incr_cli.config.recipe import TrackingConfig
from incr_cli.faults import fault_point
from incr_cli.store.files import read_lines
from incr_cli.store.workspace import Workspace
from incr_cli.tracking.base import RunInfo, train_scalars, version_scalars, written_by

REGISTRY_ALIAS = "current"  # MLflow reserves "latest"; incr's `current` follows LATEST too


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
            written = written_by(ws, version, key)
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


def build_mlflow_sink(config: TrackingConfig, workspace: Path) -> MlflowSink:
    # default: everything inside the workspace; a server keeps the artifacts where it is told to
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workspace / 'mlflow.db').resolve()}"
    local = not uri.startswith(("http://", "https://", "databricks"))
    artifacts = (workspace / "mlflow-artifacts").resolve().as_uri() if local else None
    return MlflowSink(uri, config.mlflow_experiment, config.registered_model, artifacts, workspace)


def mlflow_configured(workspace: Path) -> bool:
    """Whether the workspace has an MLflow store: $MLFLOW_TRACKING_URI, or WS/mlflow.db from a tracked run."""
    return bool(os.environ.get("MLFLOW_TRACKING_URI")) or (workspace / "mlflow.db").is_file()
