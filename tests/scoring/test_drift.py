"""Embedding drift recorded by train-increment, its gate key, and `incr eval`'s drift table (CLI)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from incr_cli.cli.app import app

runner = CliRunner()


def train(ws, *overrides):
    return runner.invoke(app, ["train-increment", str(ws.root), "train.steps=2", *overrides])


def metrics(ws, version):
    return json.loads((ws.version_dir(version) / "metrics.json").read_text())


def test_drift_is_recorded_for_every_lineage_increment_and_shown_by_eval(two_increments):
    ws = two_increments
    result = train(ws, "drift.max_sequences=8")
    assert result.exit_code == 0, result.output
    drift = metrics(ws, "v0002")["embedding_drift"]
    assert drift["parent"] == "v0001" and drift["pooling"] == "mean" and drift["max_sequences"] == 8
    assert sorted(drift["increments"]) == ws.increments()  # the earlier one and the new one
    for d in [*drift["increments"].values(), drift["all"]]:
        assert 0.0 < d["mean_cosine"] < 1.0 and 0.0 <= d["neighbour_overlap"] <= 1.0
    assert all(d["n"] <= 8 for d in drift["increments"].values())
    assert drift["all"]["n"] == sum(d["n"] for d in drift["increments"].values())

    shown = runner.invoke(app, ["eval", str(ws.root)])
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.stdout.splitlines() if line.split()[:2] == ["v0002", "v0001"])
    assert f"{drift['all']['mean_cosine']:.3f}" in row
    doc = json.loads(runner.invoke(app, ["eval", str(ws.root), "--json"]).stdout)
    assert doc["embedding_drift"]["v0002"] == drift and "v0001" in doc["embedding_drift"]


@pytest.mark.slow
def test_the_drift_gate_rejects_a_version_that_moves_too_far(two_increments):
    ws = two_increments
    result = train(ws, "gate.max_embedding_drift=0")
    assert result.exit_code == 3, result.output
    assert "max_embedding_drift on d0001" in result.stderr and ws.latest() == "v0001"
    checks = [c for c in metrics(ws, "v0002")["gate"]["checks"] if c["check"] == "max_embedding_drift"]
    assert len(checks) == 2 and all(c["value"] > 0 and not c["passed"] for c in checks)

    loose = train(ws, "gate.max_embedding_drift=2", "train.seed=1")
    assert loose.exit_code == 0, loose.output
    assert ws.latest() == "v0003"


def test_drift_off_and_a_gate_without_it(two_increments):
    ws = two_increments
    bad = train(ws, "drift.max_sequences=0", "gate.max_embedding_drift=0.1")
    assert bad.exit_code == 2 and "gate.max_embedding_drift: needs drift.max_sequences > 0" in bad.stderr
    assert ws.versions() == ["v0000", "v0001"]
    off = train(ws, "drift.max_sequences=0")
    assert off.exit_code == 0, off.output
    assert metrics(ws, "v0002")["embedding_drift"] is None
