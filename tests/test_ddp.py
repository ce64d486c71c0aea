"""Data-parallel training: two gloo processes on CPU under torchrun, one writer, identical ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers_train import REPO, copy_workspace, template


@pytest.mark.slow
def test_two_gloo_processes_train_one_version(tmp_path, tmp_path_factory):
    ws = copy_workspace(template(tmp_path_factory, "two_increments"), tmp_path / "ws")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("INCR_FAULT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "incr_cli", "train-increment", str(ws.root), "--json", "train.steps=3", "eval.max_sequences=8"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)  # rank 0 alone prints (and writes)
    assert metrics["world_size"] == 2 and metrics["promoted"] and metrics["steps"] == 3
    # Each rank took its own 8 new + 3 replayed rows (on top) of every global batch of 22.
    assert 0 < metrics["tokens"] <= 3 * 2 * (8 + 3) * 64
    assert ws.versions() == ["v0000", "v0001", "v0002"] and ws.latest() == "v0002"
    manifest = ws.verify_version("v0002")
    assert manifest["world_size"] == 2 and manifest["replay"] == ["d0001-austen"]
    # The ranks' weights were compared before writing (a mismatch fails the run), and only one
    # version was written although two processes trained.
    assert "different weights" not in proc.stderr
    # grad_norm: every rank holds the same all-reduced gradients, so the sum over ranks is divided back
    log = [json.loads(line) for line in (ws.version_dir("v0002") / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < line["grad_norm"] < 100 and line["mfu"] > 0 for line in log)
