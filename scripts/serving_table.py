"""README's serving table from real runs: a compressed student's metrics.json and the embedding drift
that two lines recorded for the same increment (e.g. the demo's distill+replay and plain fine-tune).

    python scripts/serving_table.py --student WS2 [--drift NAME=WS:VERSION ...] [--drift-json OUT.json]

Prints Markdown tables (numbers as measured; nothing is computed here but ratios). ``--drift-json``
keeps the drift records (results/drift-demo.json), from which docs/serving.md's table is rendered
(scripts/doc_tables.py, ``drift``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_tables import drift_table as render_drift  # noqa: E402


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def student_table(ws: Path) -> str:
    m = _read(ws / "checkpoints" / "v0000" / "metrics.json")
    t, s = m["teacher"], m["student"]
    lines = [f"Teacher {t['version']} ({t['layers']} layers, hidden {t['hidden']}) -> student ({s['layers']} layers "
             f"from teacher layers {m['student_layers_from_teacher']}, hidden {s['hidden']}): {m['steps']} steps, "
             f"{m['tokens']:,} tokens, {m['train_seconds']:.0f} s of training on {m['device']} ({m['precision']}); "
             f"loss terms {', '.join(m['loss_terms'])}.", "",
             "| | teacher | student | student / teacher |", "| --- | ---: | ---: | ---: |"]

    def row(name: str, a: float, b: float, fmt: str) -> None:
        lines.append(f"| {name} | {a:{fmt}} | {b:{fmt}} | {b / a:.2f}x |")

    row("parameters", t["parameters"], s["parameters"], ",")
    row("weights on disk (MB)", t["weights_bytes"] / 1e6, s["weights_bytes"] / 1e6, ".1f")
    row("encoder inference tokens/s (CPU)", t["tokens_per_second"], s["tokens_per_second"], ",.0f")
    for inc, ts in m["eval"]["teacher"].items():
        ss = m["eval"]["student"][inc]
        row(f"{inc} held-out perplexity", ts["perplexity"], ss["perplexity"], ".1f")
        row(f"{inc} held-out accuracy (%)", 100 * ts["accuracy"], 100 * ss["accuracy"], ".1f")
    return "\n".join(lines)


def drift_records(specs: list[str]) -> dict:
    """NAME=WS:VERSION specs -> {"lines": [{name, version, drift: metrics.json's embedding_drift}], "date"}."""
    lines = []
    for spec in specs:
        name, _, where = spec.partition("=")
        ws, _, version = where.rpartition(":")
        metrics = _read(Path(ws) / "checkpoints" / version / "metrics.json")
        lines.append({"name": name, "version": version, "drift": metrics["embedding_drift"],
                      "steps": metrics["steps"]})
    return {"lines": lines, "date": time.strftime("%Y-%m-%d", time.gmtime())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path)
    parser.add_argument("--drift", nargs="*", default=[], help="NAME=WORKSPACE:VERSION")
    parser.add_argument("--drift-json", type=Path, default=None, help="Also write the drift records here.")
    args = parser.parse_args()
    if args.student:
        print(student_table(args.student) + "\n")
    if args.drift:
        records = drift_records(args.drift)
        print(render_drift(records))
        if args.drift_json:
            args.drift_json.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
