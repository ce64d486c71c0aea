"""Is a compressed student good for being compressed, or for being trained more? README's compression
table, with the controls the first measurement lacked.

    python scripts/compress_check.py OUT [--teacher-steps 80] [--steps 60] [--batch-size 16]
                                     [--json results/compress-check.json] [-- OVERRIDES...]

One teacher, three lines trained from it with the same budget (``--steps`` steps of ``--batch-size``
rows on the same data, the teacher's increments), each through ``incr compress`` (the command's own
path, so the same loop, data order and held-out split):

- ``student``: 3 layers (teacher layers 0, 2, 4), MLM + distillation to the teacher (the recipe's
  ``distill.*``): what `incr compress WS --layers 3` gives;
- ``teacher+steps``: all 6 layers, the same loss and steps: the teacher trained as much more as the
  student was, so a lead of the student over it cannot come from the extra training;
- ``student, no distillation``: 3 layers, the same steps, MLM only (``distill.alpha=0``,
  ``distill.hidden_weight=0``): what distillation adds at this size.

The teacher is the demo line's v0001 as ``scripts/demo.sh`` trains it (MiniLM-L6, demo recipe,
samples/austen.txt, ``--teacher-steps`` steps). Each line is scored on the teacher's held-out
Austen split (``incr compress`` records it) and on the downstream task in samples/tasks (``incr
probe``: a logistic-regression probe on frozen mean-pooled embeddings, 5 grouped folds). Numbers are
written as measured; ``--json`` keeps them for ``scripts/doc_tables.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASK = REPO / "samples" / "tasks" / "pydocs-sections.jsonl"
LINES = {  # name -> (layers, extra overrides)
    "student": (3, []),
    "teacher+steps": (6, []),
    "student, no distillation": (3, ["distill.alpha=0", "distill.hidden_weight=0"]),
}


def incr(*args: object) -> str:
    """Run ``incr ARGS`` as a user would; -> its stdout. Logs stream to this script's stderr."""
    command = [sys.executable, "-m", "incr_cli", *map(str, args)]
    print("$ incr " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    return subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True).stdout


def line_folder(out: Path, name: str) -> Path:
    """The workspace of one line: ``teacher+steps`` -> OUT/teacher-plus-steps."""
    return out / name.replace(" ", "-").replace(",", "").replace("+", "-plus-")


def task_scores(ws: Path, version: str) -> dict:
    """``incr probe``'s accuracy, macro-F1 and chance rate of ``version`` on the task file."""
    doc = json.loads(incr("probe", ws, TASK, "--group-field", "source", "--versions", version, "--json"))
    scores = doc["scores"][version]
    return {k: scores[k] for k in ("accuracy", "accuracy_ci", "macro_f1", "chance") if k in scores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--teacher-steps", type=int, default=80)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = args.out / "teacher"
    started = time.time()
    if not (teacher / "checkpoints" / "v0001").is_dir():
        incr("init", teacher, "--base", "minilm-l6", "--recipe", REPO / "recipes" / "demo-minilm.yaml")
        incr("ingest", teacher, REPO / "samples" / "austen.txt", "--name", "austen")
        incr("train-increment", teacher, f"train.steps={args.teacher_steps}", *args.overrides)
    budget = [f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", *args.overrides]
    result = {"teacher": {"workspace": "teacher", "version": "v0001", "steps": args.teacher_steps},
              "budget": {"steps": args.steps, "batch_size": args.batch_size, "overrides": args.overrides},
              "cpu_threads": os.cpu_count(), "lines": {}}
    for name, (layers, extra) in LINES.items():
        into = line_folder(args.out, name)
        if not (into / "checkpoints" / "v0000").is_dir():
            incr("compress", teacher, "--version", "v0001", "--layers", layers, "--into", into, *budget, *extra)
        m = json.loads((into / "checkpoints" / "v0000" / "metrics.json").read_text())
        result["lines"][name] = {"layers": layers, "overrides": extra, "metrics": {
            k: m[k] for k in ("teacher", "student", "eval", "steps", "tokens", "train_seconds", "loss_terms",
                              "device", "precision") if k in m}}
    result["task"] = {"file": str(TASK.relative_to(REPO)), "teacher": task_scores(teacher, "v0001")}
    for name in LINES:
        into = line_folder(args.out, name)
        result["task"][name] = task_scores(into, "v0000")
    result["seconds"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=2) + "\n"
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
