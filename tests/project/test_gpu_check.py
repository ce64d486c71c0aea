"""scripts/gpu_check.py on CPU: its arguments, its time budget, its steps' commands, and the one JSON
it assembles from the files the steps write (a real tiny increment, a real pytest JUnit file).

The check itself needs a CUDA GPU; none has been lent to this project yet, so it has not run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import gpu_check  # noqa: E402


def test_defaults_fit_eight_minutes_and_name_every_step(tmp_path):
    args = gpu_check.parse_args([])
    assert args.budget == 480 and args.only == list(gpu_check.STEPS) and args.increment_steps == [80, 50]
    steps = gpu_check.plan_steps(args, tmp_path)
    assert [s.name for s in steps] == ["tests", "increment", "bench"]
    assert sum(s.timeout for s in steps) == pytest.approx(480)
    commands = {s.name: [" ".join(c) for c in s.commands] for s in steps}
    assert "-m gpu" in commands["tests"][0] and "--junitxml=" in commands["tests"][0]
    trains = [c for c in commands["increment"] if " train-increment " in c]
    assert len(trains) == 2 and all("runtime.device=cuda runtime.precision=bf16" in c for c in trains)
    assert "--base minilm-l6" in commands["increment"][0] and "demo-minilm.yaml" in commands["increment"][0]
    assert commands["bench"][0].split()[1:3] == [str(SCRIPTS.parent / "benchmarks" / "bench_train.py"), "--gpu"]


def test_only_some_steps_get_the_whole_budget(tmp_path):
    steps = gpu_check.plan_steps(gpu_check.parse_args(["--only", "bench", "--budget", "100"]), tmp_path)
    assert [(s.name, s.timeout) for s in steps] == [("bench", 100)]


@pytest.mark.parametrize("argv", [["--only", "tests,gpu"], ["--increment-steps", "80"], ["--increment-steps", "a,b"],
                                  ["--budget", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    assert exc.value.code == 2 and "--" in capsys.readouterr().err


def test_without_cuda_it_writes_the_json_saying_so_and_exits_2(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "machine_info", lambda python: {"host": "h", "cuda_available": False})
    out = tmp_path / "check.json"
    assert gpu_check.main(["--out", str(out), "--only", "tests"]) == 2
    doc = json.loads(out.read_text())
    assert doc["passed"] is False and doc["steps"]["tests"]["skipped"] == "no CUDA device is visible"


def test_a_step_that_runs_out_of_time_is_recorded_and_stops(tmp_path):
    step = gpu_check.Step("tests", [[sys.executable, "-c", "import time; print('started', flush=True); "
                                     "time.sleep(30)"], [sys.executable, "-c", "print('never')"]], 2.0)
    result = gpu_check.run_step(step, cwd=tmp_path)
    assert result["timed_out"] and not result["passed"] and result["seconds"] < 20
    assert "time.sleep" in result["failed_command"] and "never" not in result["tail"]


def test_one_json_with_every_figure_from_the_steps_real_files(tmp_path, two_increments):
    """A real two-version line (the tiny model, as the increment step leaves MiniLM's), a real JUnit file
    from pytest, and a bench JSON in bench_train.py's layout -> one JSON with every figure."""
    from typer.testing import CliRunner

    from incr_cli.cli.app import app

    ws = two_increments
    trained = CliRunner().invoke(app, ["train-increment", str(ws.root), "train.steps=2", "runtime.precision=bf16"])
    assert trained.exit_code == 0, trained.output
    steps = {s.name: s for s in gpu_check.plan_steps(gpu_check.parse_args(["--budget", "400"]), tmp_path)}
    steps["increment"].outputs = {"first": ws.version_dir("v0001") / "metrics.json",
                                  "second": ws.version_dir("v0002") / "metrics.json"}
    test_file = tmp_path / "test_one.py"
    test_file.write_text("def test_ok():\n    pass\n")
    junit = steps["tests"].outputs["junit"]
    results = {"increment": {"passed": True, "seconds": 1.0}, "bench": {"passed": True, "seconds": 0.0}}
    results["tests"] = gpu_check.run_step(gpu_check.Step("tests", [[sys.executable, "-m", "pytest", "-q", "-p",
                                                                     "no:cacheprovider", str(test_file),
                                                                     f"--junitxml={junit}"]], 120), cwd=tmp_path)
    bench = {"machine": {"gpu": "NVIDIA H200"}, "gpu_peak_bf16_flops": 989e12, "matmul": {"bf16": {}},
             "targets": [{"target": "bf16 seq 128: b/a >= 1.5", "value": 2.0, "passed": True}],
             "groups": [{"precision": "bf16", "seq_len": 128, "batch": 128, "ratios": {"b/a": 2.0},
                         "configs": {"a": {"label": "HF Trainer", "tokens_per_second": 1.0, "mfu": 0.4}}}]}
    steps["bench"].outputs["bench"].write_text(json.dumps(bench))

    doc = gpu_check.assemble({"host": "here"}, list(steps.values()), results, 400, device="cpu")
    json.dumps(doc)  # plain JSON all through
    assert set(doc["steps"]) == {"tests", "increment", "bench"} and doc["seconds"] >= 1.0
    # every step exited 0, but the template's v0001 was trained in fp32: the check fails, saying so
    assert not doc["passed"] and doc["steps"]["tests"]["passed"] and doc["steps"]["bench"]["passed"]
    assert doc["steps"]["increment"]["problems"] == ["austen: trained on cpu in fp32, not cpu in bf16"]
    assert doc["steps"]["tests"]["figures"] == {"tests": 1, "failures": 0, "errors": 0, "skipped": 0,
                                                "passed": 1, "failed_names": []}
    first, second = (doc["steps"]["increment"]["figures"][k] for k in ("austen", "pydocs"))
    assert first["version"] == "v0001" and second["version"] == "v0002" and second["steps"] == 2
    assert second["precision"] == "bf16" and second["tokens_per_second"] > 0
    assert set(second["perplexity"]["after"]) == set(ws.trained_on("v0002"))
    assert doc["steps"]["bench"]["figures"]["groups"][0]["configs"]["a"]["mfu"] == 0.4


def test_a_step_that_exits_0_fails_when_its_figures_break_a_promise():
    """A missed bench target, a bench that checked nothing, skipped or absent GPU tests, an
    increment that ran in fp32 or off the GPU: each fails its step by name."""
    ok = {"target": "bf16 seq 128: incr/HF >= 1.5", "value": 1.7, "passed": True}
    missed = {"target": "bf16 seq 512: incr/HF >= 1.5", "value": 1.2, "passed": False}
    assert gpu_check.problems("bench", {"targets": [ok]}) == []
    assert gpu_check.problems("bench", {"targets": [ok, missed]}) == [
        "target missed: bf16 seq 512: incr/HF >= 1.5 (measured 1.2)"]
    assert gpu_check.problems("bench", {"targets": []}) == ["the bench checked no target"]
    assert gpu_check.problems("bench", None) == ["no bench JSON"]
    tests = {"tests": 6, "failures": 0, "errors": 0, "skipped": 0}
    assert gpu_check.problems("tests", tests) == []
    assert gpu_check.problems("tests", {**tests, "skipped": 2}) == ["2 GPU test(s) skipped on a GPU machine"]
    assert gpu_check.problems("tests", {**tests, "tests": 0}) == ["no GPU-marked test ran"]
    run = {"device": "cuda:0", "precision": "bf16"}
    assert gpu_check.problems("increment", {"austen": run, "pydocs": run}) == []
    assert gpu_check.problems("increment", {"austen": run, "pydocs": {**run, "precision": "fp32"}}) == [
        "pydocs: trained on cuda:0 in fp32, not cuda in bf16"]
    assert gpu_check.problems("increment", {"austen": {**run, "device": "cpu"}, "pydocs": None}) == [
        "austen: trained on cpu in bf16, not cuda in bf16", "pydocs: no metrics.json"]
