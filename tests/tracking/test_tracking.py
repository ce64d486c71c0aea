"""Tracking: the log's grad norm / lr / MFU, and the TensorBoard and MLflow sinks read back with
their own readers (tensorboard's EventAccumulator, MLflow's client on a local sqlite store)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from incr_cli import tracking
from incr_cli.cli.app import app
from incr_cli.config.recipe import TrackingConfig, load_recipe
from incr_cli.line.increment import train_increment
from incr_cli.progress import Quiet
from incr_cli.runtime.flops import Meter, ModelShape, model_shape, step_flops
from incr_cli.store.workspace import Workspace
from incr_cli.tracking import base, tensorboard_sink
from incr_cli.tracking import mlflow_sink as mlflow_mod
from incr_cli.training.schedule import decay_steps, lr_factor, warmup_steps
from tests.helpers_train import REPO, _ingest, excerpt

runner = CliRunner()
ARGS = ["train.steps=4", "train.log_every=2"]


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An sqlite store with MLflow's tables made once (creating them takes seconds)."""
    db = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_uri(tmp_path, _mlflow_template) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copy(_mlflow_template, db)
    return f"sqlite:///{db}"


def MlflowClient(tracking_uri: str):  # noqa: N802 - imported when used: mlflow takes seconds to import
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar, read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _log(ws: Workspace, version: str) -> list[dict]:
    text = (ws.version_dir(version) / "train_log.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _runs(uri: str, version: str | None = None) -> list:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("incr")
    query = f"tags.`incr.version` = '{version}'" if version else ""
    return client.search_runs([experiment.experiment_id], filter_string=query)


# ----------------------------------------------------------------------------- the log line


def test_mfu_is_model_flops_per_second_over_the_peak():
    shape = ModelShape(layers=2, hidden=32, heads=2, intermediate=64, vocab=100)
    meter = Meter(shape, teacher=True, last_layer_masked=True, head_all_positions=False,
                  peak_flops_per_s=1e9, peak_source="test", devices=2)
    flops = step_flops(shape, 16, 64, head_positions=150, teacher_positions=150, last_layer_rows=150)["total"]
    assert meter.mfu(16, 64, 150, seconds=2.0) == pytest.approx(flops / 2.0 / 2e9)
    unknown = Meter(shape, False, False, True, None, "unknown")
    assert unknown.mfu(16, 64, 150, 2.0) is None


def test_mfu_is_only_counted_for_models_the_formula_describes():
    from transformers import BertConfig, DistilBertConfig, ModernBertConfig

    bert = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    assert model_shape(bert) == ModelShape(layers=2, hidden=32, heads=2, intermediate=64, vocab=100)
    assert model_shape(DistilBertConfig()) is None and model_shape(ModernBertConfig()) is None


def test_log_lines_carry_grad_norm_before_clipping_lr_and_mfu(one_pending):
    recipe = load_recipe(one_pending.recipe_path, [*ARGS, "train.max_grad_norm=1e-6"])
    result = train_increment(one_pending, recipe)
    lines = _log(one_pending, result.version)
    assert [line["step"] for line in lines] == [2, 4]
    t = recipe.train
    for line in lines:
        assert line["grad_norm"] > 1e-3  # the norm before clipping to 1e-6
        # lr: the schedule's value at the line's last step
        warmup = warmup_steps(4, t.warmup_ratio)
        expected = t.lr * lr_factor(line["step"] - 1, total_steps=4, warmup=warmup, schedule=t.schedule,
                                    min_lr_ratio=t.min_lr_ratio, decay=decay_steps(4, warmup, t.decay_ratio))
        assert line["lr"] == pytest.approx(expected)
        assert line["tokens_per_second"] > 0 and 0 < line["mfu"] < 1  # against the measured matmul rate
    peak = result.metrics["mfu_peak"]
    assert peak["flops_per_s"] > 0 and "matmul" in peak["source"]


# ----------------------------------------------------------------------------- both sinks, two versions


@pytest.mark.slow
def test_each_version_is_one_tensorboard_run_and_one_mlflow_run(one_pending, mlflow_uri, tmp_path, monkeypatch):
    ws = one_pending
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    args = [*ARGS, "tracking.registered_model=line"]
    for name in ("austen", "fortunes"):
        if name == "fortunes":
            _ingest(ws, excerpt("fortunes.txt", slice(0, 200), tmp_path), name)
        result = runner.invoke(app, ["train-increment", str(ws.root), "--track", "tensorboard,mlflow", *args])
        assert result.exit_code == 0, result.output
        assert "warning" not in result.output

    board = ws.root / "tensorboard"
    assert sorted(p.name for p in board.iterdir()) == ["line", "v0001", "v0002"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    for version in ("v0001", "v0002"):
        lines = _log(ws, version)
        # v0001 has no earlier increment: no replayed rows, so no KL term (distill.rows=replay)
        for key in ("total", "grad_norm", "lr", "tokens_per_second", "mfu", "mlm_new",
                    *(("mlm_replay", "distill") if version == "v0002" else ())):
            got = _scalars(board / version, f"train/{key}")
            assert [s for s, _ in got] == [2, 4], (version, key)
            assert [v for _, v in got] == pytest.approx([line[key] for line in lines], rel=1e-6)
        metrics = json.loads((ws.version_dir(version) / "metrics.json").read_text())
        for inc, scores in metrics["eval"]["after"].items():
            assert _scalars(board / version, f"eval/after/{inc}/perplexity") == [(4, pytest.approx(scores["perplexity"]))]
        assert _scalars(board / version, "gate/passed") == [(4, 1.0)]

        (run,) = _runs(mlflow_uri, version)  # one run per version
        assert run.info.status == "FINISHED" and run.data.tags["incr.status"] == "promoted"
        assert run.data.tags["incr.parent"] == metrics["parent"] and run.data.params["train.steps"] == "4"
        history = client.get_metric_history(run.info.run_id, "train/grad_norm")
        assert [(m.step, m.value) for m in history] == [(line["step"], pytest.approx(line["grad_norm"])) for line in lines]
        assert run.data.metrics["gate/passed"] == 1.0
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.json", "manifest.json"}
    forgetting = json.loads((ws.version_dir("v0002") / "metrics.json").read_text())["forgetting"]
    (inc, value), = forgetting.items()
    assert _scalars(board / "v0002", f"forgetting/{inc}") == [(4, pytest.approx(value))]
    assert _scalars(board / "line", "gate/passed") == [(1, 1.0), (2, 1.0)]  # the line across versions
    current = client.get_model_version_by_alias("line", "current")
    assert current.tags["incr.version"] == "v0002" and current.source == str(ws.version_dir("v0002").resolve())


# ----------------------------------------------------------------------------- resume


def _run_info(version: str = "v0001") -> base.RunInfo:
    return base.RunInfo(version, "v0000", "key-1", ["d0001-a"], {"train": {"lr": 1e-3}})


def _line(step: int) -> dict:
    return {"step": step, "mlm_new": 5.0 - step / 10, "total": 5.0 - step / 10, "grad_norm": 1.0, "lr": 1e-3,
            "tokens": 100 * step, "tokens_per_second": 10.0, "mfu": None}


def test_a_resumed_run_continues_without_duplicated_steps(tmp_path, mlflow_uri):
    """Killed after logging steps 1-6 with state saved at 4: the rerun hands the sinks the lines up
    to 4 and goes on from 5. Each sink shows steps 1-8 once, in one run."""
    board = tmp_path / "tb"
    artifacts = (tmp_path / "artifacts").as_uri()
    for sink in (tensorboard_sink.TensorBoardSink(board), mlflow_mod.MlflowSink(mlflow_uri, "incr", None, artifacts)):
        sink.start(_run_info(), [])
        for step in range(1, 7):
            sink.step(_line(step))
        if isinstance(sink, tensorboard_sink.TensorBoardSink):
            sink.writer.flush()  # what the killed process had sent
        resumed = type(sink)(board) if isinstance(sink, tensorboard_sink.TensorBoardSink) else \
            mlflow_mod.MlflowSink(mlflow_uri, "incr", None, artifacts)
        resumed.start(_run_info(), [_line(s) for s in range(1, 5)])
        for step in range(5, 9):
            resumed.step(_line(step))
        resumed.close("FINISHED")
    assert [s for s, _ in _scalars(board / "v0001", "train/total")] == list(range(1, 9))
    (run,) = _runs(mlflow_uri, "v0001")
    history = MlflowClient(tracking_uri=mlflow_uri).get_metric_history(run.info.run_id, "train/total")
    assert sorted(m.step for m in history) == list(range(1, 9))


@pytest.mark.slow
def test_kill_9_then_rerun_shows_one_continuous_run(one_pending, mlflow_uri, monkeypatch):
    ws = one_pending
    args = ["train.steps=6", "train.log_every=1", "runtime.save_every=2", "tracking.sinks=[tensorboard, mlflow]"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    env = {**os.environ, "INCR_FAULT": "train.step@5:kill"}
    killed = subprocess.run([sys.executable, "-m", "incr_cli", "train-increment", str(ws.root), *args],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    result = runner.invoke(app, ["train-increment", str(ws.root), "--json", *args])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from_step"] == 4
    assert [s for s, _ in _scalars(ws.root / "tensorboard" / "v0001", "train/total")] == list(range(1, 7))
    (run,) = _runs(mlflow_uri)
    history = MlflowClient(tracking_uri=mlflow_uri).get_metric_history(run.info.run_id, "train/total")
    assert sorted(m.step for m in history) == list(range(1, 7)) and run.info.status == "FINISHED"


# ----------------------------------------------------------------------------- failing sinks


@pytest.mark.parametrize("mlflow_fault", ["store cannot be opened", "not installed"])
def test_failing_sinks_only_warn(one_pending, monkeypatch, mlflow_fault):
    """A TensorBoard folder that cannot be made and an MLflow that cannot work: one warning line
    each, and the version is written and promoted."""
    blocker = one_pending.root / "tensorboard"  # a file where the folder should be
    blocker.write_text("")
    overrides = [*ARGS, "tracking.sinks=[tensorboard, mlflow]"]
    if mlflow_fault == "not installed":
        monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
        monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/sub/x.db")
    reporter = Quiet()
    result = train_increment(one_pending, load_recipe(one_pending.recipe_path, overrides), reporter=reporter)
    assert result.promoted and (one_pending.version_dir(result.version) / "metrics.json").exists()
    warnings = sorted(m for m in reporter.messages if m.startswith("warning: tracking:"))
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("warning: tracking: mlflow failed and is off for this run (")
    assert warnings[1].startswith("warning: tracking: tensorboard failed and is off for this run (")
    if mlflow_fault == "not installed":
        assert "pip install 'incr-cli[mlflow]'" in warnings[0]


class _Stuck:
    name = "stuck"

    def __init__(self):
        self.release = threading.Event()

    def start(self, run, history):
        self.release.wait()

    def step(self, line):
        pass

    def finish(self, metrics, version_dir):
        pass

    def close(self, status):
        pass


def test_a_stuck_sink_is_left_behind_after_flush_timeout():
    sink, reporter = _Stuck(), Quiet()
    tracker = tracking.Tracker([sink], reporter, flush_timeout=0.05)
    tracker.start(_run_info(), [])
    for step in range(1, 100):
        tracker.step(_line(step))  # returns at once: the calls queue up behind the stuck one
    tracker.close()
    sink.release.set()
    assert reporter.messages == ["warning: tracking: stuck still sending after 0.05 s (tracking.flush_timeout); "
                                 "left behind, the version's own files are the record"]


def test_track_option_sets_the_sinks_and_rejects_unknown_ones(one_pending, monkeypatch):
    result = runner.invoke(app, ["train-increment", str(one_pending.root), "--track", "tensorboard,wandb", "--dry-run"])
    assert result.exit_code == 2
    assert "tracking.sinks: 'wandb' is not one of tensorboard, mlflow" in result.output
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    board, mlflow = tracking.build_sinks(TrackingConfig(sinks=["tensorboard", "mlflow"]), one_pending.root)
    assert board.root == one_pending.root / "tensorboard"  # everything inside the workspace by default
    assert mlflow.uri == f"sqlite:///{(one_pending.root / 'mlflow.db').resolve()}"


# ----------------------------------------------------------------------------- runs left open, the registry


@pytest.mark.slow
def test_kill_9_after_the_version_was_written_is_finished_by_the_next_command(one_pending, mlflow_uri, monkeypatch):
    """Killed while the sinks sent the written version's scores: the TensorBoard folder lacks them,
    the MLflow run stays RUNNING; the next train-increment (nothing left to train) completes both
    from the version's files, every step once."""
    ws = one_pending
    args = ["train.steps=4", "train.log_every=1", "tracking.sinks=[tensorboard, mlflow]",
            "tracking.registered_model=line"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    env = {**os.environ, "INCR_FAULT": "tracking.finish:kill"}
    killed = subprocess.run([sys.executable, "-m", "incr_cli", "train-increment", str(ws.root), *args],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    (run,) = _runs(mlflow_uri, "v0001")
    assert run.info.status == "RUNNING" and ws.latest() == "v0001"  # written and promoted, the run left open
    assert "gate/passed" not in run.data.metrics
    board = ws.root / "tensorboard"
    assert not (board / "line").exists() and not (board / "v0001" / tensorboard_sink.TensorBoardSink.FINISHED).exists()

    result = runner.invoke(app, ["train-increment", str(ws.root), *args])
    assert result.exit_code == 0 and "nothing to train" in result.output, result.output
    (run,) = _runs(mlflow_uri, "v0001")  # still one run for the version, now complete
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert run.info.status == "FINISHED" and run.data.tags["incr.status"] == "promoted"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/total")) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "gate/passed")] == [4]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.json", "manifest.json"}
    current = client.get_model_version_by_alias("line", "current")
    assert current.tags["incr.version"] == "v0001" and current.run_id == run.info.run_id
    assert [s for s, _ in _scalars(board / "v0001", "train/total")] == [1, 2, 3, 4]
    assert _scalars(board / "v0001", "gate/passed") == [(4, 1.0)] and _scalars(board / "line", "gate/passed") == [(1, 1.0)]


def test_a_run_whose_version_never_got_written_is_killed_by_the_next_command(one_pending, mlflow_uri, tmp_path,
                                                                            monkeypatch):
    """A run left RUNNING by a process that died before writing its version is KILLED by the next
    command of its workspace (here `incr promote`); a run of another workspace sharing the store is
    not touched."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    artifacts = (tmp_path / "artifacts").as_uri()
    for root in (one_pending.root, tmp_path / "another-workspace"):
        sink = mlflow_mod.MlflowSink(mlflow_uri, "incr", None, artifacts, root)
        sink.start(_run_info(), [])
        sink.step(_line(1))  # and the process dies: no finish, no close
    result = runner.invoke(app, ["promote", str(one_pending.root), "v0000"])
    assert result.exit_code == 0 and "nothing moved" in result.output, result.output
    status = {run.data.tags["incr.workspace"]: run.info.status for run in _runs(mlflow_uri, "v0001")}
    assert status == {str(one_pending.root.resolve()): "KILLED", str((tmp_path / "another-workspace").resolve()): "RUNNING"}


@pytest.mark.slow
def test_promote_and_rollback_move_the_registry_alias(two_increments, mlflow_uri, monkeypatch):
    """v0002 is rejected by the gate; `incr promote` registers it (with its run) and moves `current`
    to it; `incr rollback` moves `current` back to v0001, registered then though it was trained
    untracked; promoting v0002 again reuses its model version."""
    ws = two_increments
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    args = [*ARGS, "tracking.sinks=[mlflow]", "tracking.registered_model=line", "gate.min_improvement=0.99"]
    rejected = runner.invoke(app, ["train-increment", str(ws.root), *args])
    assert rejected.exit_code == 3, rejected.output
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.search_model_versions("name = 'line'") == []  # a rejected version is not registered

    def current() -> tuple[str, str]:
        mv = client.get_model_version_by_alias("line", "current")
        return mv.tags.get("incr.version"), mv.source

    for command, expected in ((["promote", str(ws.root), "v0002", "--reason", "reviewed"], "v0002"),
                              (["rollback", str(ws.root)], "v0001"), (["promote", str(ws.root), "v0002"], "v0002")):
        result = runner.invoke(app, command)
        assert result.exit_code == 0 and "warning" not in result.output, result.output
        assert ws.latest() == expected
        assert current() == (expected, str(ws.version_dir(expected).resolve()))
    versions = {mv.tags.get("incr.version"): mv for mv in client.search_model_versions("name = 'line'")}
    assert sorted(versions) == ["v0001", "v0002"]  # each registered once
    (run,) = _runs(mlflow_uri, "v0002")
    assert versions["v0002"].run_id == run.info.run_id and not versions["v0001"].run_id


def test_a_failing_registry_only_warns_on_promote(one_pending, monkeypatch):
    blocker = one_pending.root / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/sub/x.db")
    result = runner.invoke(app, ["promote", str(one_pending.root), "v0000"])
    assert result.exit_code == 0, result.output
    assert "warning: tracking: mlflow failed and is off for this run (" in result.output
