"""Data-parallel training: two gloo processes on CPU under torchrun, one writer, identical ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers_train import REPO, weights


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("INCR_FAULT", None)
    return env


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node NPROC -m incr_cli ARGS`` to its end."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "incr_cli", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_two_gloo_processes_train_one_version(tmp_path, workspace_copy):
    ws = workspace_copy("two_increments", tmp_path / "ws")
    proc = torchrun("train-increment", str(ws.root), "--json", "train.steps=3", "eval.max_sequences=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)  # rank 0 alone prints (and writes)
    assert metrics["world_size"] == 2 and metrics["promoted"] and metrics["steps"] == 3
    # Each rank took its own 8 new + 3 replayed rows (on top) of every global batch of 22.
    assert 0 < metrics["tokens"] <= 3 * 2 * (8 + 3) * 64
    assert ws.versions() == ["v0000", "v0001", "v0002"] and ws.latest() == "v0002"
    manifest = ws.verify_version("v0002")
    assert manifest["world_size"] == 2 and manifest["replay"] == ["d0001-austen"]
    # only one version was written although two processes trained (the ranks' weights are compared
    # before writing: test_ddp_faults breaks that on purpose)
    # grad_norm: every rank holds the same all-reduced gradients, so the sum over ranks is divided back
    log = [json.loads(line) for line in (ws.version_dir("v0002") / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < line["grad_norm"] < 100 and line["mfu"] > 0 for line in log)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_accumulating_the_same_global_batch(tmp_path, workspace_copy):
    """2 ranks x 1 micro-batch and 1 process x 2 micro-batches (grad_accum=2) train on the same rows
    with the same masks: the same token count exactly, the same weights up to float summation order
    (gloo's all-reduce sums the two gradients in another order than accumulation does). The model has
    no dropout: each process draws its own dropout stream, which no rank count can reproduce."""
    args = ["--json", "train.steps=4", "eval.max_sequences=8"]
    ddp = workspace_copy("two_increments_no_dropout", tmp_path / "ddp")
    single = workspace_copy("two_increments_no_dropout", tmp_path / "single")
    two = torchrun("train-increment", str(ddp.root), *args)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "incr_cli", "train-increment", str(single.root), *args,
                          "train.grad_accum=2"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = json.loads(two.stdout), json.loads(one.stdout)
    assert (a["world_size"], b["world_size"]) == (2, 1) and a["steps"] == b["steps"] == 4
    assert a["tokens"] == b["tokens"] > 0  # the same rows, counted exactly
    wa, wb = weights(ddp, "v0002"), weights(single, "v0002")
    moved = max((wb[k] - weights(single, "v0001")[k]).abs().max().item() for k in wb)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"moved {moved:.3g}, worst {worst:.3g}")
    assert moved > 1e-3 and worst < 1e-5, (moved, worst)  # training moved the weights; the two runs agree


def two_nodes(ws_root, *args: str, port: int, fault: str | None = None) -> list[subprocess.CompletedProcess]:
    """Two ``torchrun`` agents on this machine standing for two nodes, as users start one per node:
    ``--nnodes 2 --nproc-per-node 1``, c10d rendezvous (here on localhost), one shared workspace."""
    env = {**_env(), **({"INCR_FAULT": fault} if fault else {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", f"incr-{port}",
               "-m", "incr_cli", "train-increment", str(ws_root), *args]
    agents = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    return [subprocess.CompletedProcess(a.args, a.wait(timeout=300), *a.communicate()) for a in agents]


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_train_resume_and_agree_with_one_process(tmp_path, workspace_copy):
    """README's multi-node command on one machine: the same weights as one process accumulating the
    same global batch, one writer, and a run stopped on both nodes resumes where it stopped."""
    args = ["--json", "train.steps=4", "eval.max_sequences=8", "runtime.save_every=1"]
    nodes = workspace_copy("two_increments_no_dropout", tmp_path / "nodes")
    single = workspace_copy("two_increments_no_dropout", tmp_path / "single")
    stopped = two_nodes(nodes.root, *args, port=29561, fault="train.step@2:int")
    assert all(a.returncode != 0 for a in stopped), [a.stderr[-2000:] for a in stopped]
    assert any("interrupted by SIGINT after step 2 of 4" in a.stderr for a in stopped)
    assert nodes.versions() == ["v0000", "v0001"] and any(nodes.staging.glob("resume/*/CURRENT"))
    resumed = two_nodes(nodes.root, *args, port=29562)
    assert all(a.returncode == 0 for a in resumed), [a.stderr[-2000:] for a in resumed]
    printed = [json.loads(a.stdout) for a in resumed if a.stdout.strip()]
    assert len(printed) == 1, "global rank 0 alone prints and writes"
    assert printed[0]["world_size"] == 2 and printed[0]["resumed_from_step"] == 2
    assert nodes.versions() == ["v0000", "v0001", "v0002"] and nodes.latest() == "v0002"
    one = subprocess.run([sys.executable, "-m", "incr_cli", "train-increment", str(single.root), *args,
                          "train.grad_accum=2"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert printed[0]["tokens"] == json.loads(one.stdout)["tokens"]
    wa, wb = weights(nodes, "v0002"), weights(single, "v0002")
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-5, worst
