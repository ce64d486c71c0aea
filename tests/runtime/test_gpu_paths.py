"""Every CUDA path, on a GPU: NCCL under torchrun, compress, export and vocabulary growth. Skipped
without CUDA (`make gpu-check` runs them: ``pytest -m gpu``). Each uses the tiny test model, so a
failure names the path, not a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from incr_cli.cli.app import app
from tests.helpers_train import REPO, excerpt, reset_faults

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = ["runtime.device=cuda", "runtime.precision=auto"]


def cli(*args: object):
    reset_faults()
    return CliRunner().invoke(app, [str(a) for a in args])


def test_nccl_under_torchrun_with_one_gpu_trains_a_version(two_increments):
    env = {k: v for k, v in os.environ.items() if k != "INCR_FAULT"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           "-m", "incr_cli", "train-increment", str(two_increments.root), "--json", "train.steps=3",
                           *CUDA], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)
    assert metrics["device"].startswith("cuda") and metrics["world_size"] == 1 and metrics["promoted"]
    assert two_increments.latest() == "v0002"


def test_compress_on_cuda_trains_and_seals_the_student(two_increments, tmp_path):
    result = cli("compress", two_increments.root, "--layers", "1", "--into", tmp_path / "student",
                 "train.steps=2", *CUDA)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "student" / "checkpoints" / "v0000" / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["student"]["layers"] == 1


def test_export_of_a_cuda_trained_version_in_every_format(two_increments, tmp_path):
    assert cli("train-increment", two_increments.root, "train.steps=2", *CUDA).exit_code == 0
    for args in (["--dtype", "bf16"], ["--format", "onnx"], ["--quantize", "int8"]):
        out = tmp_path / "-".join(a.strip("-") for a in args)
        result = cli("export", two_increments.root, out, *args, "--json")
        assert result.exit_code == 0, (args, result.output)
        assert json.loads(result.stdout)["version"] == "v0002"


def test_vocabulary_growth_then_a_cuda_increment(two_increments, tmp_path):
    text = excerpt("pydocs.txt", slice(0, 300), tmp_path)
    grown = cli("ingest", two_increments.root, text, "--name", "pydocs", "--extend-vocab", "5", "--json")
    assert grown.exit_code == 0, grown.output
    result = cli("train-increment", two_increments.root, "train.steps=2", *CUDA)
    assert result.exit_code == 0, result.output
    metrics = json.loads((two_increments.version_dir("v0002") / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["vocab"]
