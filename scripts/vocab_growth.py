"""Measure vocabulary growth on real text: MiniLM-L6 adapted from Austen to the Python docs, the
second increment once with the line's tokenizer and once with ``--extend-vocab N``, at the same step
budget. A v0002 the gate rejects (exit 3: the recipe's task gate, say) is measured like a promoted
one: the tables say which were promoted. Prints README's markdown tables and writes OUT/results.json (commit it as
results/vocab-growth.json: scripts/doc_tables.py renders the README's tables from it).

    .venv/bin/python scripts/vocab_growth.py OUT [--words 200] [--steps1 80] [--steps2 50] [key=value ...]

The two second increments train at the same time, one torch thread each, so that they share the
machine's load alike (their tokens/s are compared). Every seed is fixed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from doc_tables import vocab_table  # scripts/ is on sys.path when this runs as a script

REPO = Path(__file__).resolve().parent.parent
INCR = [sys.executable, "-m", "incr_cli"]
SENTENCES = [
    "The [MASK] module supplies classes for manipulating dates and times.",
    "Use the asyncio [MASK] to run the coroutine.",
    "A tuple is an immutable [MASK] of values.",
    "She was too [MASK] to speak of her sister's engagement.",
]


def incr(*args: str, parallel: bool = False) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [*INCR, *args]
    print("$ incr", " ".join(args), flush=True)
    if parallel:
        return subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"incr {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def metrics(ws: Path, version: str) -> dict:
    return json.loads((ws / "checkpoints" / version / "metrics.json").read_text())


def fill(folder: Path) -> list[list[str]]:
    from transformers import pipeline

    fm = pipeline("fill-mask", model=str(folder), tokenizer=str(folder), device="cpu")
    return [[p["token_str"] for p in fm(s.replace("[MASK]", fm.tokenizer.mask_token), top_k=5)] for s in SENTENCES]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--words", type=int, default=200)
    ap.add_argument("--steps1", type=int, default=80)
    ap.add_argument("--steps2", type=int, default=50)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    out, over = a.out, a.overrides
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base, plain, grown = out / "base", out / "plain", out / "grown"
    started = time.time()
    incr("init", str(base), "--base", "minilm-l6", "--recipe", str(REPO / "recipes" / "demo-minilm.yaml"))
    incr("ingest", str(base), str(REPO / "samples" / "austen.txt"), "--name", "austen")
    incr("train-increment", str(base), f"train.steps={a.steps1}", *over)
    for ws in (plain, grown):
        shutil.copytree(base, ws, symlinks=True)
        (ws / "current").unlink()
        os.symlink("checkpoints/v0001", ws / "current")
    pydocs = str(REPO / "samples" / "pydocs.txt")
    incr("ingest", str(plain), pydocs, "--name", "pydocs")
    report = json.loads(incr("ingest", str(grown), pydocs, "--name", "pydocs", "--extend-vocab", str(a.words),
                             "--json").stdout)
    load_before = os.getloadavg()
    runs = {name: incr("train-increment", str(ws), f"train.steps={a.steps2}", "runtime.num_threads=1", *over,
                       parallel=True) for name, ws in (("plain", plain), ("grown", grown))}
    for name, proc in runs.items():
        text, _ = proc.communicate()
        (out / f"train-{name}.log").write_text(text)
        if proc.returncode not in (0, 3):  # 3: the gate rejected v0002; it is written and measured all the same
            raise SystemExit(f"{name}: train-increment failed ({proc.returncode}):\n{text}")
    load_after = os.getloadavg()
    result = {"words": a.words, "steps1": a.steps1, "steps2": a.steps2, "overrides": over,
              "load_average": {"before": load_before, "after": load_after},
              "ingest": report["vocab"], "plain": metrics(plain, "v0002"), "grown": metrics(grown, "v0002"),
              "v0001": metrics(base, "v0001"), "sentences": SENTENCES,
              "fill": {"plain": fill(plain / "checkpoints" / "v0002"), "grown": fill(grown / "checkpoints" / "v0002")},
              "seconds": round(time.time() - started, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(vocab_table(result))  # README's tables, as scripts/doc_tables.py renders them from the JSON


if __name__ == "__main__":
    main()
