"""The linear probe's numbers on a real encoder, for the README: `python scripts/probe_check.py`.

Inits a workspace on the real MiniLM-L6 base (installed from PyPI, no hub), embeds the whole labelled
Python-docs task (samples/tasks/pydocs-sections.jsonl) once per max_length, then probes the same
embeddings under the settings a user could pick: C, group-aware folds or not, the seeded half-sample.
Writes results/probe-pydocs.json (every figure) and results/probe-pydocs.md (the table the README quotes).
Times are seconds on this machine; ratios between rows are what carries to another one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from incr_cli.config.recipe import TaskConfig, build_recipe
from incr_cli.model import weights as models
from incr_cli.scoring import tasks as T
from incr_cli.scoring.embed import EmbedSettings, embed_texts
from incr_cli.store.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "samples" / "tasks" / "pydocs-sections.jsonl"


def probe_row(emb, data: T.TaskData, probe, *, grouped: bool) -> dict:
    started = time.perf_counter()
    scores = T.classification_scores(emb, data.labels, data.groups if grouped else None, probe)
    return {"accuracy": round(scores["accuracy"], 4), "accuracy_ci": [round(x, 4) for x in scores["accuracy_ci"]],
            "macro_f1": round(scores["macro_f1"], 4), "chance": round(scores["chance"], 4),
            "examples": scores["examples"], "probe_seconds": round(time.perf_counter() - started, 2)}


def measure(ws: Workspace) -> list[dict]:
    recipe = build_recipe({})
    model, tokenizer = models.load_version(ws, "v0000", recipe=recipe, device="cpu")
    rows = []
    for max_examples in (4000, 1800):
        probe = dataclasses.replace(recipe.probe, max_examples=max_examples)
        spec = TaskConfig(name="pydocs-sections", path=str(TASK), group_field="source")
        data = T.read_task(spec, probe)
        for max_length in (128, 64):
            started = time.perf_counter()
            settings = EmbedSettings(batch_size=probe.batch_size, max_length=max_length)
            emb, cut = embed_texts(model, tokenizer, data.texts, settings=settings)
            embed_s = round(time.perf_counter() - started, 2)
            for C in (1.0, 0.1, 0.01):
                for grouped in (True, False):
                    if not grouped and (C != 0.1 or max_length != 128):
                        continue  # ungrouped once, to show the leak
                    row = probe_row(emb, data, dataclasses.replace(probe, C=C), grouped=grouped)
                    rows.append({"max_examples": max_examples, "max_length": max_length, "C": C, "grouped": grouped,
                                 "cut": round(cut / len(data.texts), 3), "embed_seconds": embed_s, **row})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def end_to_end(ws_root: Path) -> dict:
    """`incr probe` as a user runs it, with the default settings, no cache: the whole process."""
    incr = [sys.executable, "-m", "incr_cli"]
    started = time.perf_counter()
    proc = subprocess.run([*incr, "probe", str(ws_root), str(TASK), "--group-field", "source", "--no-cache", "--json"],
                          capture_output=True, text=True, check=True)
    wall = round(time.perf_counter() - started, 1)
    return {"wall_seconds": wall, "scores": json.loads(proc.stdout)["scores"]["v0000"]}


def table(doc: dict) -> str:
    lines = ["| examples | max_length | C | folds | accuracy (95% interval) | macro-F1 | embed s | probe s |",
             "|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in doc["rows"]:
        folds = "by document" if r["grouped"] else "**rows (leaks)**"
        lo, hi = r["accuracy_ci"]
        lines.append(f"| {r['examples']:,} | {r['max_length']} | {r['C']} | {folds} | {r['accuracy']:.3f} "
                     f"({lo:.3f}-{hi:.3f}) | {r['macro_f1']:.3f} | {r['embed_seconds']:.1f} | {r['probe_seconds']:.1f} |")
    e = doc["end_to_end"]
    lines += ["", f"Chance (the largest class's share): {doc['rows'][0]['chance']:.3f}. `incr probe` with the "
              f"default settings ({e['scores']['examples']:,} examples, max_length {e['scores']['max_length']}, "
              f"C {doc['default_C']}), the whole process, no cache: {e['wall_seconds']} s wall, accuracy "
              f"{e['scores']['accuracy']:.3f}.", "",
              f"Machine: {doc['machine']}, torch {doc['torch']}, {doc['threads']} threads."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "results" / "probe-pydocs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        subprocess.run([sys.executable, "-m", "incr_cli", "init", str(root), "--base", "minilm-l6"], check=True,
                       capture_output=True)
        rows = measure(Workspace.open(root))
        doc = {"task": str(TASK.relative_to(REPO)), "model": "minilm-l6 (v0000, the pretrained base)",
               "default_C": build_recipe({}).probe.C, "rows": rows, "end_to_end": end_to_end(root),
               "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(table(doc), encoding="utf-8")
    print(table(doc))


if __name__ == "__main__":
    main()
